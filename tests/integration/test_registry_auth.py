"""Approval against `mlflow server --app-name basic-auth` on loopback, with its own auth database.

MLflow lets EDIT set a version's tags and a model's aliases; approving, rejecting, promoting and
rolling back need MANAGE, which registry.actions checks before changing anything, and what EDIT can
set by hand (a status tag, an alias, a copied signature) is reported and never served.
"""

import contextlib
import importlib.util
import os
import subprocess

import pytest

from mlops import services
from mlops.cli import main
from tests.conftest import PYTHON, REPO

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
    it, each with its own weights file, whose source run alice authored (v1: refusals, v2: editor's
    direct edits, v3: the approval); the approval key in the module's own config directory."""
    assert importlib.util.find_spec("flask_wtf"), "mlflow's basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'"
    tmp = tmp_path_factory.mktemp("auth")
    patch = pytest.MonkeyPatch()
    patch.setenv("MLOPS_CONFIG_DIR", str(tmp / "config"))
    patch.delenv("MLOPS_APPROVAL_KEYRING", raising=False)
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
            for k in range(3):
                run = client.create_run(experiment, tags={"mlflow.user": "alice"})
                (tmp / "weights.bin").write_bytes(bytes([k]) * 64)
                client.log_artifact(run.info.run_id, str(tmp / "weights.bin"), "model")
                store.register_version(client, MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id, {})
            for user, permission in USERS.items():
                auth.create_user(user, password(user))
                auth.grant_user_permission(user, "registered_model", MODEL, permission)
        yield uri
    finally:
        services.stop(proc)
        patch.undo()


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
    assert event["identity"] == f"authenticated by {server}"
    with as_user("reader"):
        from mlflow import MlflowClient

        from registry import store

        verdict = store.verify_version(MlflowClient(tracking_uri=server, registry_uri=server), record)
    assert verdict.approved and (verdict.record.approver, verdict.record.identity) == ("manager", event["identity"])

    code, _, err = cli(server, "manager", capsys, "promote", MODEL, "3")
    assert code == 0, err
    record, aliases = admin_view(server, "3")
    assert aliases == {"champion": "3"}
    with as_user("admin"):
        from mlflow import MlflowClient

        from registry import store

        history = store.alias_history(MlflowClient(tracking_uri=server, registry_uri=server), MODEL)
    assert [(h["version"], h["previous"], h["by"]) for h in history] == [("3", None, "manager")]


def serve_refusal(uri, user, tmp_path):
    """``mlops serve`` of the champion as ``user``: its exit status and last line of standard error."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_USERNAME": user,
           "MLFLOW_TRACKING_PASSWORD": password(user)}
    done = subprocess.run([PYTHON, "-m", "mlops.cli", "--tracking-uri", uri, "serve", "--name", MODEL, "--port", "0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    return done.returncode, (done.stderr.strip().splitlines() or [""])[-1]


def test_an_editor_who_approves_and_promotes_by_hand_gets_nothing_served_and_is_reported(server, capsys, tmp_path):
    """The MLflow UI's path with EDIT: the status tag, the champion alias, even v3's valid signature
    copied onto v2. None of it verifies: listed as unverified, refused by serving, moved back by the
    promotion flow's gate check."""
    from mlflow import MlflowClient

    from registry import actions, signing

    copied = admin_view(server, "3")[0].tags[signing.SIGNATURE_TAG]  # v3 was approved through the CLI above
    with as_user("editor"):
        client = MlflowClient(tracking_uri=server, registry_uri=server)
        client.set_model_version_tag(MODEL, "2", "approval_status", "Approved")
        client.set_model_version_tag(MODEL, "1", "approval_status", "Approved")
        client.set_model_version_tag(MODEL, "2", signing.SIGNATURE_TAG, copied)
        client.set_registered_model_alias(MODEL, "champion", "2")
    record, aliases = admin_view(server, "2")
    assert aliases == {"champion": "2"} and record.status == "Approved"  # MLflow allowed every edit

    code, out, err = cli(server, "reader", capsys, "list", MODEL)
    assert code == 0, err
    copied_why = f"the signed record is for {MODEL} v3, not this version"
    assert out.splitlines() == [
        f"{MODEL} v1: Approved  accuracy=?  UNVERIFIED: approval_status says Approved but no signed decision exists",
        f"{MODEL} v2 [champion]: Approved  accuracy=?  UNVERIFIED: {copied_why}",
        f"{MODEL} v3: Approved  accuracy=?",
        f"{MODEL}@champion -> v2: champion set outside the gate: {copied_why}",
    ]
    code, line = serve_refusal(server, "reader", tmp_path)
    assert code == 2
    assert line == (f"error: {MODEL}@champion names v2, whose approval does not verify: {copied_why}; nothing served "
                    "(approve it with `mlops models approve`, or move champion back)")

    with as_user("editor"), pytest.raises(Exception, match="lacks MANAGE"):
        actions.check_gate(server, MODEL, revert=True)  # moving it back is a registry change: MANAGE
    with as_user("manager"):
        lines, reverted = actions.check_gate(server, MODEL, revert=True)
    assert f"{MODEL}@champion -> v2: champion set outside the gate: {copied_why}" in lines
    assert (reverted["version"], reverted["previous"], reverted["by"]) == ("3", "2", "manager")
    assert admin_view(server, "3")[1] == {"champion": "3"}


@pytest.fixture(scope="module")
def approval_service(server, tmp_path_factory):
    """``python -m registry.service`` against the server, writing as admin, its key in its own directory."""
    tmp = tmp_path_factory.mktemp("approval-service")
    port = services.free_port()
    env = {"MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1],
           "MLOPS_CONFIG_DIR": str(tmp / "config"), "PYTHONPATH": str(REPO)}
    url = f"http://127.0.0.1:{port}"
    proc = services.start_server([PYTHON, "-m", "registry.service", "--tracking-uri", server, "--port", str(port)],
                                 f"{url}/health", 120, env, tmp / "service.log")
    try:
        yield url
    finally:
        services.stop(proc)


def test_the_approval_service_signs_for_authenticated_managers_only(server, approval_service, capsys, tmp_path,
                                                                     monkeypatch):
    import httpx
    from mlflow import MlflowClient

    from registry import signing, store

    with as_user("admin"):
        client = MlflowClient(tracking_uri=server, registry_uri=server)
        run = client.create_run(client.get_experiment_by_name("auth").experiment_id, tags={"mlflow.user": "alice"})
        (tmp_path / "weights.bin").write_bytes(b"v4 weights")
        client.log_artifact(run.info.run_id, str(tmp_path / "weights.bin"), "model")
        version = store.register_version(client, MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id, {}).version
    body = {"model": MODEL, "version": version, "decision": "Approved", "reason": "direct"}
    decisions = f"{approval_service}/decisions"
    assert httpx.post(decisions, json=body, timeout=60).status_code == 401
    wrong = httpx.post(decisions, json=body, auth=("manager", "wrong"), timeout=60)
    assert wrong.status_code == 401 and "could not be authenticated" in wrong.json()["error"]
    refused = httpx.post(decisions, json=body, auth=("editor", password("editor")), timeout=60)
    assert refused.status_code == 403
    assert refused.json()["error"] == (f"approve {MODEL} v{version}: user 'editor' lacks MANAGE permission on the "
                                       "registered model (has EDIT)")
    assert admin_view(server, version)[0].history == ()

    monkeypatch.setenv("MLOPS_APPROVAL_SERVICE", approval_service)
    monkeypatch.setenv("MLOPS_CONFIG_DIR", str(tmp_path / "manager-config"))  # the manager holds no key
    code, _, err = cli(server, "manager", capsys, "approve", MODEL, version, "--reason", "reviewed on the service")
    assert code == 0, err
    assert not (tmp_path / "manager-config").exists()
    record, _ = admin_view(server, version)
    (event,) = record.history
    assert (event["by"], event["identity"]) == ("manager", f"authenticated by {server} (approval service)")
    service_keys = tmp_path / "service-keyring.json"
    service_keys.write_text(httpx.get(f"{approval_service}/keyring", timeout=10).text)
    with as_user("reader"):
        reader = MlflowClient(tracking_uri=server, registry_uri=server)
        verdict = store.verify_version(reader, record, signing.Keyring.load(service_keys))
        assert verdict.approved and verdict.record.approver == "manager"
        assert "does not hold" in store.verify_version(reader, record, signing.Keyring.load(tmp_path / "none")).why
