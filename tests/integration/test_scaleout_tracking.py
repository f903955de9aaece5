"""`mlops up` as a team's tracking server: MLflow on PostgreSQL with artifacts on S3 (moto), proxied
so clients hold no S3 credentials; `mlops db upgrade`; and the one-line refusals that come before
any server starts (unmigrated or unreachable database, missing bucket, wrong S3 credentials, a
public interface without authentication). PostgreSQL and S3 come from tests/integration/pg_s3.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from mlops import services
from tests.conftest import PYTHON, REPO
from tests.integration.pg_s3 import StrictS3Server, postgres, s3_server  # noqa: F401 (fixtures)

ADMIN_PASSWORD = "admin-password-1"
APPROVER = ("carol", "carol-password-1")
MODEL = "digits-team"


def mlops(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """``mlops ARGS`` in ``cwd`` (whose settings.yaml, if any, it reads) with the repository importable."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_EC2_METADATA_DISABLED": "true", **(env or {})}
    return subprocess.run([PYTHON, "-m", "mlops.cli", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def assert_refused(done: subprocess.CompletedProcess, cwd: Path, port: int, *fragments: str) -> str:
    """One ``error:`` line naming each fragment, exit 2, no traceback, and no server started."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "MLflow UI" not in done.stdout
    assert not (cwd / ".mlops-logs").exists()
    assert not _port_open(port)
    return lines[0]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _database_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def migrated_template(postgres):  # noqa: F811 (the fixture imported above)
    """A database with MLflow's schema at head, made once by `mlops db upgrade` (about 13 s on 2
    cores); tests take copies of it (CREATE DATABASE ... TEMPLATE), so each starts from the same."""
    url = postgres.create_database("mlflow_template")
    services.upgrade_database(url)
    return _database_name(url)


# ---- pure logic: which interfaces count as exposed, driver and artifact options ----

@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True),
                                            ("::1", True), ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.20", False), ("10.0.0.5", False)])
def test_is_loopback(host, loopback):
    assert services.is_loopback(host) is loopback


def test_a_reachable_interface_needs_auth_or_insecure(monkeypatch):
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "k")
    services.check_exposure("127.0.0.1", auth=False, insecure=False)
    services.check_exposure("0.0.0.0", auth=True, insecure=False)
    services.check_exposure("0.0.0.0", auth=False, insecure=True)
    with pytest.raises(services.ServiceError, match=r"--host 0\.0\.0\.0: .*basic-auth .*--insecure"):
        services.check_exposure("0.0.0.0", auth=False, insecure=False)
    monkeypatch.delenv("MLFLOW_FLASK_SERVER_SECRET_KEY")
    for host in ("192.168.1.20", "127.0.0.1"):
        with pytest.raises(services.ServiceError, match="MLFLOW_FLASK_SERVER_SECRET_KEY"):
            services.check_exposure(host, auth=True, insecure=False)


def test_postgresql_urls_name_psycopg_and_hide_the_password():
    assert services.database_url("postgresql://u:pw@db:5432/mlflow") == "postgresql+psycopg://u:pw@db:5432/mlflow"
    assert services.database_url("postgres://u@db/mlflow") == "postgresql+psycopg://u@db/mlflow"
    assert services.database_url("postgresql+psycopg2://u@db/m") == "postgresql+psycopg2://u@db/m"
    assert services.database_url("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    shown = services.describe_database("postgresql://u:secret@db:5432/mlflow")
    assert "secret" not in shown and "PostgreSQL through psycopg" in shown


def test_remote_artifacts_are_proxied_and_local_ones_written_directly(tmp_path):
    assert services.artifact_args("s3://bucket/team") == ["--artifacts-destination", "s3://bucket/team",
                                                          "--serve-artifacts"]
    assert services.artifact_args(tmp_path) == ["--default-artifact-root", tmp_path.as_uri()]
    # other machines cannot write a directory of the server's machine: a team server proxies it
    assert services.artifact_args(tmp_path, proxy=True) == ["--artifacts-destination", str(tmp_path),
                                                            "--serve-artifacts"]


def test_a_bad_database_url_is_one_line():
    with pytest.raises(services.ServiceError, match="expected a database URL"):
        services.check_database("not a url")


# ---- the team server on PostgreSQL + S3 ----

CLIENT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from mlflow import MlflowClient
    from mlflow.server import get_app_client
    from registry import auth

    uri, work, admin_password, approver, approver_password, model = sys.argv[1:7]
    work = Path(work)
    credentials = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                   "MLFLOW_S3_ENDPOINT_URL")
    assert not [k for k in credentials if k in os.environ]

    def as_user(name, password):
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = name, password
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    # an admin gives an approver an account and MANAGE on the model, as the README shows
    admin = as_user("admin", admin_password)
    admin.create_registered_model(model)
    accounts = get_app_client("basic-auth", tracking_uri=uri)
    accounts.create_user(approver, approver_password)
    accounts.grant_user_permission(approver, "registered_model", model, "MANAGE")

    client = as_user(approver, approver_password)
    identity = auth.server_identity(uri, "check")
    auth.check_can_manage(uri, identity, model, "approve")
    experiment = client.create_experiment("team")
    run = client.create_run(experiment)
    run_id = run.info.run_id
    client.log_metric(run_id, "val_accuracy", 0.93, step=1)
    (work / "notes.txt").write_text("logged through the proxy")
    client.log_artifact(run_id, str(work / "notes.txt"), artifact_path="reports")
    client.set_terminated(run_id)
    version = client.create_model_version(model, f"runs:/{run_id}/reports", run_id)
    fetched = Path(client.download_artifacts(run_id, "reports/notes.txt", str(work))).read_text()
    print(json.dumps({"experiment": experiment, "run_id": run_id, "artifact_uri": run.info.artifact_uri,
                      "version": version.version, "status": client.get_model_version(model, version.version).status,
                      "user": identity.username, "fetched": fetched}))
""")


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """Reads the child's stdout until a line contains ``text``; fails if it exits first."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise AssertionError(f"mlops up exited with {proc.returncode}: {''.join(seen)}")
            continue
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"no {text!r} within {timeout} s: {''.join(seen)}")


@pytest.mark.slow
def test_up_on_postgresql_and_s3_proxies_artifacts_to_clients_without_s3_credentials(
        postgres, s3_server, migrated_template, tmp_path):  # noqa: F811
    db = postgres.create_database("mlflow", template=migrated_template)
    auth_db = postgres.create_database("mlflow_auth")
    bucket = s3_server.create_bucket("mlflow")
    (tmp_path / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {services.database_url(auth_db)}\n"
        f"admin_username = admin\nadmin_password = {ADMIN_PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = services.free_port()
    # the server alone holds the S3 credentials and endpoint
    env = {**os.environ, **s3_server.env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
           "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test"}
    proc = subprocess.Popen([PYTHON, "-m", "mlops.cli", "up", "--no-prefect", "--mlflow-port", str(port),
                             "--backend-store", db, "--artifacts", f"s3://{bucket}/team", "--auth"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = _wait_for_line(proc, "stops everything", timeout=240)
        assert "(PostgreSQL through psycopg)" in banner and "(basic auth)" in banner
        assert f"s3://{bucket}/team (proxied: clients need no storage credentials)" in banner
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200

        client_env = {k: v for k, v in os.environ.items()
                      if not k.startswith(("AWS_", "MLFLOW_S3_", "MLFLOW_TRACKING_", "MLFLOW_AUTH"))}
        client_env.update({"PYTHONPATH": str(REPO), "AWS_EC2_METADATA_DISABLED": "true",
                           "AWS_CONFIG_FILE": str(tmp_path / "none"),
                           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")})
        (tmp_path / "client").mkdir()
        done = subprocess.run([PYTHON, "-c", CLIENT, f"http://127.0.0.1:{port}", str(tmp_path / "client"),
                               ADMIN_PASSWORD, *APPROVER, MODEL], env=client_env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["artifact_uri"].startswith("mlflow-artifacts:/")
        assert result["user"] == APPROVER[0]
        assert result["fetched"] == "logged through the proxy"
        assert (result["version"], result["status"]) == ("1", "READY")

        key = f"team/{result['experiment']}/{result['run_id']}/artifacts/reports/notes.txt"
        assert key in s3_server.keys(bucket, "team/")
        body = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        assert body == b"logged through the proxy"

        name = _database_name(db)
        metric = postgres.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = 'val_accuracy'",
                                  name, (result["run_id"],))
        assert metric == [(0.93,)]
        versions = postgres.execute("SELECT name, version FROM model_versions", name)
        assert versions == [(MODEL, 1)]
        users = postgres.execute("SELECT username FROM users ORDER BY username", _database_name(auth_db))
        assert users == [("admin",), (APPROVER[0],)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=120) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not _port_open(port)


@pytest.mark.slow
def test_db_upgrade_creates_the_schema_that_up_then_accepts(postgres, tmp_path):  # noqa: F811
    db = postgres.create_database("mlflow")
    port = services.free_port()
    assert_refused(mlops("up", "--no-prefect", "--mlflow-port", str(port), "--backend-store", db, cwd=tmp_path),
                   tmp_path, port, f"127.0.0.1:{postgres.port}/{_database_name(db)}", "no MLflow schema yet",
                   f"run `mlops db upgrade {db}`")
    from sqlalchemy.engine import make_url

    with_password = make_url(db).set(password="s3cret")  # the cluster trusts loopback: any password passes
    line = assert_refused(mlops("up", "--no-prefect", "--mlflow-port", str(port), "--backend-store",
                                with_password.render_as_string(hide_password=False), cwd=tmp_path), tmp_path, port,
                          f"run `mlops db upgrade {with_password.set(password='PASSWORD').render_as_string(False)}` "
                          "(with the URL's password)")
    assert "s3cret" not in line

    done = mlops("db", "upgrade", db, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""  # MLflow's and Alembic's progress lines stay out
    assert "(PostgreSQL through psycopg): schema created at revision" in done.stdout
    from mlflow.store.db.utils import _get_latest_schema_revision

    head = _get_latest_schema_revision()
    assert services.check_database(db) == head
    again = mlops("db", "upgrade", db, cwd=tmp_path)
    assert again.returncode == 0 and f"schema already at revision {head}" in again.stdout, again.stderr


@pytest.mark.slow
def test_up_refuses_a_schema_older_or_newer_than_this_mlflow(postgres, migrated_template, tmp_path):  # noqa: F811
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config, _get_latest_schema_revision

    head = _get_latest_schema_revision()
    previous = ScriptDirectory.from_config(_get_alembic_config(db_url="")).get_revision(head).down_revision
    db = postgres.create_database("mlflow", template=migrated_template)
    postgres.execute("UPDATE alembic_version SET version_num = %s", _database_name(db), (previous,))
    port = services.free_port()
    assert_refused(mlops("up", "--no-prefect", "--mlflow-port", str(port), "--backend-store", db, cwd=tmp_path),
                   tmp_path, port, f"schema at revision {previous}, this MLflow expects {head}",
                   f"`mlops db upgrade {db}`")

    postgres.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'", _database_name(db))
    with pytest.raises(services.ServiceError, match="ffffffffffff is unknown to this MLflow"):
        services.check_database(db)


@pytest.mark.slow
def test_up_refuses_an_unreachable_database(tmp_path):
    port, dead = services.free_port(), services.free_port()
    done = mlops("up", "--no-prefect", "--mlflow-port", str(port),
                 "--backend-store", f"postgresql://mlops:secret@127.0.0.1:{dead}/mlflow", cwd=tmp_path)
    line = assert_refused(done, tmp_path, port, f"127.0.0.1:{dead}/mlflow", "cannot connect")
    assert "secret" not in line
    done = mlops("db", "upgrade", f"postgresql://mlops:secret@127.0.0.1:{dead}/mlflow", cwd=tmp_path)
    line = assert_refused(done, tmp_path, port, f"127.0.0.1:{dead}/mlflow", "cannot connect")
    assert "secret" not in line


@pytest.mark.slow
def test_up_refuses_a_missing_bucket(postgres, s3_server, migrated_template, tmp_path):  # noqa: F811
    """The store, the artifacts and the endpoint from settings.yaml's server section this time."""
    db = postgres.create_database("mlflow", template=migrated_template)
    port = services.free_port()
    (tmp_path / "settings.yaml").write_text(
        f"server:\n  backend_store: {db}\n  artifacts: s3://no-such-bucket-here/team\n"
        f"  s3_endpoint_url: {s3_server.endpoint_url}\n  port: {port}\n")
    env = {k: v for k, v in s3_server.env.items() if k != "MLFLOW_S3_ENDPOINT_URL"}
    done = mlops("up", "--no-prefect", cwd=tmp_path, env=env)
    assert_refused(done, tmp_path, port, "bucket no-such-bucket-here", s3_server.endpoint_url, "no such bucket")


@pytest.mark.slow
def test_up_refuses_wrong_s3_credentials(postgres, migrated_template, tmp_path):  # noqa: F811
    strict = StrictS3Server(tmp_path / "moto.log").start()
    try:
        db = postgres.create_database("mlflow", template=migrated_template)
        port = services.free_port()
        env = {"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG", "AWS_SECRET_ACCESS_KEY": "wrong",
               "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": strict.endpoint_url,
               "MLOPS_SERVER__BACKEND_STORE": db, "MLOPS_SERVER__ARTIFACTS": "s3://team-bucket/mlflow"}
        done = mlops("up", "--no-prefect", "--mlflow-port", str(port), cwd=tmp_path, env=env)
        assert_refused(done, tmp_path, port, "bucket team-bucket", strict.endpoint_url, "wrong S3 credentials")
    finally:
        strict.stop()


@pytest.mark.slow
def test_up_on_every_interface_refuses_without_auth(tmp_path):
    port = services.free_port()
    assert_refused(mlops("up", "--no-prefect", "--mlflow-port", str(port), "--host", "0.0.0.0", cwd=tmp_path),
                   tmp_path, port, "--host 0.0.0.0", "basic-auth mode (--auth)", "--insecure")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    done = subprocess.run([PYTHON, "-m", "mlops.cli", "up", "--no-prefect", "--mlflow-port", str(port),
                           "--host", "0.0.0.0", "--auth"], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert_refused(done, tmp_path, port, "MLFLOW_FLASK_SERVER_SECRET_KEY")


@pytest.mark.slow
@pytest.mark.parametrize("busy, fragment", [(0, "--mlflow-port {port}: port {port} on 127.0.0.1 is in use"),
                                            (1, "the approval service (--mlflow-port {port} + 1): port {busy} ")])
def test_up_refuses_a_port_in_use_before_any_server_starts(tmp_path, busy, fragment):
    port = services.free_port()
    env = {"MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-1", "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret",
           "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "admin-password-1"}
    with socket.socket() as held:
        try:
            held.bind(("127.0.0.1", port + busy))
        except OSError:
            pytest.skip(f"port {port + busy} was taken meanwhile")
        held.listen()
        done = mlops("--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "up", "--no-prefect", "--auth",
                     "--mlflow-port", str(port), cwd=tmp_path, env=env)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert fragment.format(port=port, busy=port + busy) in lines[0] and "expected a free port" in lines[0], lines[0]
    assert "MLflow UI" not in done.stdout and not (tmp_path / ".mlops-logs").exists()


def test_nothing_is_connected_at_import():
    done = subprocess.run([PYTHON, "-c", "import mlops.services, sys; "
                           "print(sorted(m for m in ('sqlalchemy', 'boto3', 'psycopg', 'mlflow') if m in sys.modules))"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
