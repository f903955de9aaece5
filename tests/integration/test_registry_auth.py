"""Approval against `mlflow server --app-name basic-auth` on loopback, with its own auth database.

MLflow lets EDIT set a version's tags and a model's aliases; approving, rejecting, promoting and
rolling back need MANAGE, which registry.actions checks before changing anything.
"""

import contextlib
import importlib.util
import os

import pytest

from mlops import services
from mlops.cli import main

pytestmark = pytest.mark.slow

MODEL = "digits-classifier"
ADMIN = ("admin", "admin-password-1")
USERS = {"alice": "READ", "reader": "READ", "editor": "EDIT", "manager": "MANAGE", "denied": "DENY"}


def password(user):
    return ADMIN[1] if user == "admin" else f"{user}-password-1"


@contextlib.contextmanager
def as_user(user):
    """MLflow clients read credentials from the environment at each request."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
    os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
    if user:
        os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password(user))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A basic-auth MLflow server; users with READ/EDIT/MANAGE/DENY on the model; three versions of
    it whose source run alice authored (v1: refusals, v2: editor's direct tag, v3: the approval)."""
    assert importlib.util.find_spec("flask_wtf"), "mlflow's basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'"
    tmp = tmp_path_factory.mktemp("auth")
    (tmp / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp}/auth.db\n"
        f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # successful password checks are cached, so each request does not pay a PBKDF2 hash
        "auth_cache_ttl_seconds = 300\n")
    port = services.free_port()
    proc = services.start_mlflow(f"sqlite:///{tmp}/mlflow.db", tmp / "artifacts", port, log=tmp / "server.log",
                                 extra=["--app-name", "basic-auth"],
                                 env={"MLFLOW_AUTH_CONFIG_PATH": str(tmp / "basic_auth.ini"),
                                      "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret"})
    uri = f"http://127.0.0.1:{port}"
    try:
        from mlflow import MlflowClient
        from mlflow.server import get_app_client

        from registry import store

        with as_user("admin"):
            auth = get_app_client("basic-auth", tracking_uri=uri)
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            experiment = client.create_experiment("auth")
            for _ in range(3):
                run = client.create_run(experiment, tags={"mlflow.user": "alice"})
                store.register_version(client, MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id, {})
            for user, permission in USERS.items():
                auth.create_user(user, password(user))
                auth.grant_user_permission(user, "registered_model", MODEL, permission)
        yield uri
    finally:
        services.stop(proc)


def admin_view(uri, version):
    from mlflow import MlflowClient

    from registry import store

    with as_user("admin"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return store.get_version(client, MODEL, version), client.get_registered_model(MODEL).aliases


def cli(uri, user, capsys, *argv):
    with as_user(user):
        try:
            main(["--tracking-uri", uri, "models", *argv])
            code = 0
        except SystemExit as exc:
            code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


REFUSED = {
    None: "not authenticated (set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)",
    "reader": "user 'reader' lacks MANAGE permission on the registered model (has READ)",
    "editor": "user 'editor' lacks MANAGE permission on the registered model (has EDIT)",
}


@pytest.mark.parametrize("user", list(REFUSED))
@pytest.mark.parametrize("argv, what", [
    (["approve", MODEL, "1", "--reason", "looks fine"], f"approve {MODEL} v1"),
    (["reject", MODEL, "1", "--reason", "no"], f"reject {MODEL} v1"),
    (["promote", MODEL, "1"], f"promote {MODEL} v1"),
    (["rollback", MODEL], f"rollback {MODEL}"),
])
def test_unauthorized_users_are_refused_and_nothing_changes(server, capsys, user, argv, what):
    before = admin_view(server, "1")
    code, out, err = cli(server, user, capsys, *argv)
    assert code == 2 and out == ""
    assert err.strip() == f"error: {what}: {REFUSED[user]}"
    assert admin_view(server, "1") == before


def test_a_wrong_password_is_not_authenticated(server, capsys):
    with as_user("manager"):
        os.environ["MLFLOW_TRACKING_PASSWORD"] = "wrong"
        try:
            main(["--tracking-uri", server, "models", "approve", MODEL, "1", "--reason", "x"])
        except SystemExit as exc:
            assert exc.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: approve {MODEL} v1: user 'manager' could not be authenticated (check MLFLOW_TRACKING_PASSWORD)")


def test_edit_alone_could_set_the_tag_directly_which_is_why_manage_is_checked(server):
    from mlflow import MlflowClient

    with as_user("editor"):
        MlflowClient(tracking_uri=server, registry_uri=server).set_model_version_tag(MODEL, "2", "note", "edited")
    assert admin_view(server, "2")[0].tags["note"] == "edited"


def test_a_server_denial_on_a_read_is_one_line(server, capsys):
    code, _, err = cli(server, "denied", capsys, "show", MODEL, "1")
    assert code == 2
    assert err.strip().startswith(f"error: models show {MODEL}: the tracking server denied user 'denied'")
    assert len(err.strip().splitlines()) == 1


def test_readers_can_list(server, capsys):
    code, out, err = cli(server, "reader", capsys, "list", MODEL)
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"{MODEL} v1: PendingManualApproval")


def test_manage_user_approves_and_promotes_as_themselves(server, capsys):
    code, _, err = cli(server, "manager", capsys, "approve", MODEL, "3", "--reason", "ok", "--approver", "bob")
    assert code == 2
    assert err.strip() == (f"error: approve {MODEL} v3: approver 'bob' is not the authenticated user 'manager'; "
                           "with an authenticating server the approver is the authenticated user")
    assert admin_view(server, "3")[0].status == "PendingManualApproval"

    code, out, err = cli(server, "manager", capsys, "approve", MODEL, "3", "--reason", "beats v1 on the test set",
                         "--json")
    assert code == 0, err
    record, _ = admin_view(server, "3")
    assert record.status == "Approved"
    (event,) = record.history
    assert (event["by"], event["reason"], event["via"]) == ("manager", "beats v1 on the test set", "cli")

    code, _, err = cli(server, "manager", capsys, "promote", MODEL, "3")
    assert code == 0, err
    record, aliases = admin_view(server, "3")
    assert aliases == {"champion": "3"}
    with as_user("admin"):
        from mlflow import MlflowClient

        from registry import store

        history = store.alias_history(MlflowClient(tracking_uri=server, registry_uri=server), MODEL)
    assert [(h["version"], h["previous"], h["by"]) for h in history] == [("3", None, "manager")]
