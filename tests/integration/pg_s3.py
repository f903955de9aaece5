"""PostgreSQL and S3 on loopback for the scale-out tests: import the fixtures into a test module
(``from tests.integration.pg_s3 import postgres, s3_server  # noqa: F401``) or use the classes.

PostgreSQL is :class:`mlops.postgres.PostgresCluster` (``initdb`` + ``pg_ctl`` from the machine's
binaries) in a temporary directory; tests that need it are skipped, with the reason, only where the
binaries are absent.
S3 is moto's server (``ThreadedMotoServer``) on 127.0.0.1; :class:`StrictS3Server` is a second one,
in its own process, that checks credentials as AWS does.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlops import services
from mlops.postgres import PostgresCluster, pg_bin_dir

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}


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
