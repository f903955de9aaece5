"""PostgreSQL and S3 on loopback for the scale-out tests: import the fixtures into a test module
(``from tests.integration.pg_s3 import postgres, s3_server  # noqa: F401``) or use the classes.

PostgreSQL runs from the binaries on the machine (``initdb`` + ``pg_ctl``) in a temporary directory
on a free port, with trust authentication on 127.0.0.1 and its socket in that directory; tests
that need it are skipped, with the reason, only where the binaries are absent. PostgreSQL refuses
to run as root, so under root the cluster belongs to the ``postgres`` system user (or ``nobody``).
S3 is moto's server (``ThreadedMotoServer``) on 127.0.0.1; :class:`StrictS3Server` is a second one,
in its own process, that checks credentials as AWS does.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlops import services

PG_BINARIES = ("initdb", "pg_ctl")
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}


def pg_bin_dir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: on PATH, else Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if all((candidate / name).is_file() for name in PG_BINARIES):
            return candidate
    return None


def _cluster_user() -> str | None:
    """The unprivileged account that runs the cluster when the tests run as root, else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a postgres nor a nobody account exists for PostgreSQL")


class PostgresCluster:
    """A throwaway PostgreSQL cluster: ``start()``, ``create_database()``, ``url()``, ``stop()``."""

    superuser = "mlops"

    def __init__(self, bin_dir: Path, root: Path, port: int | None = None) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.port = port or services.free_port()
        self.user = _cluster_user()

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(self.bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
                              user=self.user, cwd=self.root, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done

    def start(self) -> PostgresCluster:
        if self.user is not None:
            shutil.chown(self.root, self.user)
        self._run("initdb", "-D", str(self.data), "-U", self.superuser, "--auth=trust", "-E", "UTF8", "--no-sync")
        # -F: no fsync (a test cluster is thrown away); the socket stays in the temporary directory
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-w", "-t", "60",
                  "-o", f"-k {self.root} -h 127.0.0.1 -p {self.port} -F", "start")
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres", scheme: str = "postgresql") -> str:
        """``postgresql://mlops@127.0.0.1:PORT/database`` (the form users write; no password: trust)."""
        return f"{scheme}://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres", params: tuple = ()) -> list[tuple]:
        """Runs one statement in autocommit mode; returns its rows (empty for statements without any)."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=10) as connection:
            cursor = connection.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def create_database(self, prefix: str = "db", template: str | None = None) -> str:
        """A new database with a unique name, empty or a copy of the database named ``template``
        (which nothing may be connected to); returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One PostgreSQL cluster for the test session; each test makes its own database in it."""
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not on this machine")
    # Not under pytest's tmp_path: its parents are private to root, and the cluster's user must reach it.
    root = Path(tempfile.mkdtemp(prefix="mlops-pg-"))
    cluster = PostgresCluster(bin_dir, root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


class S3Server:
    """moto's S3 server on 127.0.0.1 in this process; any credentials are accepted."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint_url = ""

    def start(self) -> S3Server:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def env(self) -> dict[str, str]:
        """What a process that talks to this server needs: credentials and MLFLOW_S3_ENDPOINT_URL."""
        return {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def create_bucket(self, prefix: str = "bucket") -> str:
        """A new empty bucket with a unique name; returns the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the test session; each test makes its own bucket."""
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


class StrictS3Server:
    """``moto_server`` in its own process with IAM authentication on from the first request, so
    an access key it never issued is refused (403 InvalidAccessKeyId), as by AWS."""

    def __init__(self, log: Path) -> None:
        self.port = services.free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._proc: subprocess.Popen | None = None

    def start(self) -> StrictS3Server:
        self._proc = services.start_server([str(services.BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                           f"{self.endpoint_url}/moto-api/", 60,
                                           env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}, log=self.log)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            services.stop(self._proc)
