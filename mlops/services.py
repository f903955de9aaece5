"""The servers ``mlops up`` starts: `mlflow server` on the pipeline's store (or a team's PostgreSQL
and S3), a Prefect server, its worker; and the checks that run before any of them starts.

Used by ``mlops up``, ``mlops db upgrade`` and the integration tests, so all start the real
components the same way. The checks turn what a user can get wrong (an unreachable or unmigrated
database, a missing bucket, wrong S3 credentials, an unauthenticated server on a public interface)
into one line before anything is started, instead of a traceback in a server log.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ml.errors import PipelineError

BIN = Path(sys.executable).parent
# SQLAlchemy reads a bare postgresql:// as its default driver, psycopg2, which is not installed;
# psycopg 3 is the project's PostgreSQL driver.
POSTGRES_DRIVER = "postgresql+psycopg"
ANY_INTERFACE = ("0.0.0.0", "::", "")


class ServiceError(PipelineError):
    """A store, bucket or address that a server cannot start on."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int, what: str) -> None:
    """One line unless ``port`` on ``host`` can be bound as a server binds it (``SO_REUSEADDR``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ServiceError(f"{what}: port {port} on {host or '*'} is in use ({exc.strerror}); "
                               "expected a free port") from None


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Polls ``url`` until it answers 200; fails early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, proc.args))} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def _spawn(args: list[str], env: dict[str, str] | None = None, log: Path | None = None,
           cwd: str | Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    return subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                            cwd=cwd, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Terminates a server and its children (each was started in its own session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def start_mlflow(backend_uri: str, artifacts: str | Path, port: int, log: Path | None = None,
                 extra: list[str] | None = None, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1") -> subprocess.Popen:
    """``mlflow server`` on host:port over ``backend_uri``; returns once /health answers.

    ``artifacts`` is a local directory, which clients on this machine write directly, or a URI
    (``s3://bucket/prefix``), which the server proxies (``--serve-artifacts``): clients then need
    no credentials for it, only the server does (and ``MLFLOW_S3_ENDPOINT_URL`` for an
    S3-compatible endpoint). A server on another interface than loopback always proxies, since
    other machines cannot write its directory.
    """
    args = [str(BIN / "mlflow"), "server", "--backend-store-uri", database_url(backend_uri),
            *artifact_args(artifacts, proxy=not is_loopback(host)), "--host", host,
            "--port", str(port), "--workers", "1", *(extra or [])]
    # The GenAI job runner (seven huey worker processes) serves no stage of this pipeline.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    return start_server(args, f"{local_url(host, port)}/health", 120, env, log)


def is_remote_uri(location: str | Path) -> bool:
    """``s3://``, ``gs://``... rather than a local directory (``file://`` is local)."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(location))) and not str(location).startswith("file:")


def artifact_args(artifacts: str | Path, proxy: bool = False) -> list[str]:
    """The ``mlflow server`` options that put artifacts at ``artifacts`` (see :func:`start_mlflow`)."""
    if is_remote_uri(artifacts):
        return ["--artifacts-destination", str(artifacts), "--serve-artifacts"]
    location = str(artifacts).removeprefix("file://")
    if proxy:
        return ["--artifacts-destination", str(Path(location).resolve()), "--serve-artifacts"]
    return ["--default-artifact-root", Path(location).resolve().as_uri()]


def local_url(host: str, port: int) -> str:
    """The server's URL from this machine (a server on every interface answers on loopback)."""
    if host in ANY_INTERFACE:
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` is reachable from this machine alone."""
    if host in ANY_INTERFACE:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_exposure(host: str, auth: bool, insecure: bool) -> None:
    """A server other machines can reach needs MLflow's basic-auth mode, or an explicit --insecure;
    the basic-auth mode needs ``MLFLOW_FLASK_SERVER_SECRET_KEY``.

    Without accounts anyone on the network could approve and promote models, and the recorded
    approver would be whatever name they typed.
    """
    if auth and not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        # the basic-auth app refuses to start without it, with a traceback in the server's log
        raise ServiceError("--auth: set MLFLOW_FLASK_SERVER_SECRET_KEY, the key that signs the basic-auth app's "
                           "sessions and forms")
    if not (auth or insecure or is_loopback(host)):
        raise ServiceError(f"--host {host}: a tracking server other machines can reach needs MLflow's basic-auth "
                           "mode (--auth) or an explicit --insecure")


def database_url(url: str) -> str:
    """``url`` with PostgreSQL's driver made explicit (:data:`POSTGRES_DRIVER`); others unchanged."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return f"{POSTGRES_DRIVER}://{url[len(scheme):]}"
    return url


def parse_database_url(url: str) -> Any:
    """SQLAlchemy's URL of ``url`` with the driver made explicit; one line if it is not a URL."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(database_url(url))
    except ArgumentError:
        raise ServiceError(f"backend store {url!r}: expected a database URL such as "
                           "postgresql://user:password@host:5432/mlflow or sqlite:///mlflow.db") from None


def describe_database(url: str) -> str:
    """The URL with its password hidden, and the driver that serves it, for messages."""
    parsed = parse_database_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "postgresql":
        return f"{shown} (PostgreSQL through {parsed.get_driver_name()})"
    return shown


def _where(parsed: Any) -> str:
    if parsed.get_backend_name() == "sqlite":
        return f"sqlite:///{parsed.database}"
    return f"{parsed.get_backend_name()} at {parsed.host or 'localhost'}:{parsed.port or 'default port'}/{parsed.database}"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__).removeprefix("connection failed: ")


def schema_revision(url: str, timeout_s: float = 5.0) -> tuple[str | None, bool]:
    """The MLflow schema revision (alembic_version) of the database at ``url`` and whether it holds
    any table; one line naming the host if it cannot be reached."""
    import sqlalchemy
    from alembic.migration import MigrationContext
    from sqlalchemy.pool import NullPool

    parsed = parse_database_url(url)
    connect_args = {"connect_timeout": max(1, int(timeout_s))} if parsed.get_backend_name() == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(parsed, poolclass=NullPool, connect_args=connect_args)
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as exc:
        raise ServiceError(f"backend store {parsed.render_as_string(hide_password=True)}: no driver for it "
                           f"({_first_line(exc)})") from None
    try:
        with engine.connect() as connection:
            tables = bool(sqlalchemy.inspect(connection).get_table_names())
            return MigrationContext.configure(connection).get_current_revision(), tables
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise ServiceError(f"backend store {_where(parsed)}: cannot connect ({_first_line(exc)})") from None
    finally:
        engine.dispose()


def check_database(url: str, timeout_s: float = 5.0) -> str | None:
    """Checks that ``url`` is reachable and holds MLflow's schema at this MLflow's head revision,
    as the server checks at start (``mlflow.store.db.utils._verify_schema``), so a bad store is
    one line here rather than a traceback in the server's log.

    A SQLite file that does not exist yet or is empty is the embedded default's first start:
    MLflow creates its schema. A server database (PostgreSQL) is created with ``mlops db upgrade``,
    so that a team's schema changes only when someone asks for it. Returns the revision found.
    """
    from mlflow.store.db.utils import _get_latest_schema_revision
    from sqlalchemy.engine import make_url

    parsed = parse_database_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        return None
    revision, has_tables = schema_revision(url, timeout_s)
    head = _get_latest_schema_revision()
    shown = make_url(url)
    # never the password itself, but a command that reads as one to paste with it
    upgrade = (f"run `mlops db upgrade {shown.set(password='PASSWORD').render_as_string(hide_password=False)}` "
               "(with the URL's password)" if shown.password else
               f"run `mlops db upgrade {shown.render_as_string(hide_password=False)}`")
    if revision == head:
        return revision
    if revision is None and not has_tables:
        if parsed.get_backend_name() == "sqlite":
            return None
        raise ServiceError(f"backend store {_where(parsed)}: no MLflow schema yet; {upgrade} to create it")
    if revision is None:
        raise ServiceError(f"backend store {_where(parsed)}: holds tables but no MLflow schema version "
                           "(alembic_version): not an MLflow database?")
    if not _known_revision(revision):
        raise ServiceError(f"backend store {_where(parsed)}: schema revision {revision} is unknown to this "
                           f"MLflow ({_mlflow_version()}); was it migrated by a newer one?")
    raise ServiceError(f"backend store {_where(parsed)}: schema at revision {revision}, this MLflow expects "
                       f"{head}; back the database up, then {upgrade}")


def _known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    try:
        return ScriptDirectory.from_config(_get_alembic_config(db_url="")).get_revision(revision) is not None
    except Exception:  # alembic raises several kinds for an unknown id
        return False


def _mlflow_version() -> str:
    from importlib.metadata import version

    return f"mlflow {version('mlflow')}"


def upgrade_database(url: str, timeout_s: float = 5.0) -> tuple[str | None, str | None]:
    """What ``mlflow db upgrade URL`` does (create the schema in an empty database, else migrate
    it to head); returns the revisions before and after. An unreachable database is one line
    before anything is changed.

    It runs in this process on an engine without a pool, so a password in the URL never shows in
    a process listing and no connection outlives the call.
    """
    import sqlalchemy
    from alembic.util import CommandError
    from mlflow.exceptions import MlflowException
    from mlflow.store.db.utils import _initialize_tables, _is_empty_database, _upgrade_db
    from sqlalchemy.pool import NullPool

    before, _ = schema_revision(url, timeout_s)
    engine = sqlalchemy.create_engine(parse_database_url(url), poolclass=NullPool)
    # MLflow's and Alembic's progress lines (INFO) would repeat what the caller prints once
    quiet = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    try:
        if _is_empty_database(engine):
            _initialize_tables(engine)
        else:
            _upgrade_db(engine)
    except (sqlalchemy.exc.SQLAlchemyError, CommandError, MlflowException) as exc:
        raise ServiceError(f"mlflow db upgrade {describe_database(url)} failed: {_first_line(exc)}") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
        engine.dispose()
    after, _ = schema_revision(url, timeout_s)
    return before, after


def check_bucket(uri: str, endpoint_url: str | None = None, timeout_s: float = 5.0) -> None:
    """Checks that the bucket of ``s3://bucket/prefix`` exists and that this process's S3
    credentials (which the server inherits) may read it: one line naming the bucket otherwise."""
    from ml.storage import check_bucket as check_s3_bucket

    check_s3_bucket(uri, endpoint_url or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None, label="artifacts",
                    for_whom=" for the server", timeout_s=timeout_s, error=ServiceError)


def prefect_env(port: int, home: str | Path | None = None) -> dict[str, str]:
    env = {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port)}
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    return env


def start_prefect(port: int, home: str | Path | None = None, log: Path | None = None) -> subprocess.Popen:
    """``prefect server start`` on 127.0.0.1:port; returns once its health check answers."""
    args = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return start_server(args, f"http://127.0.0.1:{port}/api/health", 180, prefect_env(port, home), log)


def deploy_flows(project_dir: str | Path, env: dict[str, str], pool: str = "local") -> None:
    """Creates the process work pool (if missing) and applies deploy/prefect.yaml."""
    project_dir = Path(project_dir).resolve()
    env = {**os.environ, **env, "MLOPS_PROJECT_DIR": str(project_dir)}
    prefect = str(BIN / "prefect")
    inspect = subprocess.run([prefect, "work-pool", "inspect", pool], env=env, capture_output=True, text=True)
    if inspect.returncode != 0:
        subprocess.run([prefect, "work-pool", "create", pool, "--type", "process"], env=env, check=True,
                       capture_output=True, text=True)
    done = subprocess.run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"],
                          env=env, cwd=project_dir, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"prefect deploy failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def start_worker(project_dir: str | Path, env: dict[str, str], pool: str = "local",
                 log: Path | None = None, limit: int | None = None) -> subprocess.Popen:
    """A process worker whose flow runs use this interpreter's environment (the project's venv);
    ``limit``: the most flow runs it runs at once (Prefect's ``--limit``), None for no limit. Each
    training or tuning flow run works in its own workspace (flows/workspace.py), so one worker or
    several may run them side by side."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return _spawn([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
                   *(["--limit", str(limit)] if limit is not None else [])],
                  env={**env, "PATH": path, "MLOPS_PROJECT_DIR": str(Path(project_dir).resolve())},
                  log=log, cwd=project_dir)


def start_server(args: list[str], health_url: str, timeout: float, env: dict[str, str] | None = None,
                 log: Path | None = None, cwd: str | Path | None = None) -> subprocess.Popen:
    """Any server command in its own session (see :func:`stop`); returns once ``health_url`` answers 200."""
    proc = _spawn(args, env=env, log=log, cwd=cwd)
    try:
        wait_http(health_url, timeout=timeout, proc=proc)
    except BaseException:
        stop(proc)
        raise
    return proc
