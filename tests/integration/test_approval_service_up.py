"""`mlops up --auth` starts the approval service beside the basic-auth MLflow server, and stops it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import httpx
import pytest

from mlops.services import free_port
from tests.conftest import PYTHON, REPO

pytestmark = pytest.mark.slow


def read_until(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """The first line of the child's stdout containing ``text``; fails if it exits first."""
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"mlops up exited with {proc.returncode}: {''.join(seen)}")
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"no {text!r} within {timeout:.0f} s: {''.join(seen)}")


def free_port_pair() -> int:
    """A free port whose next one (the approval service's) is free too."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two free ports in a row")


def test_mlops_up_with_auth_starts_the_approval_service(tmp_path):
    port = free_port_pair()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "MLOPS_CONFIG_DIR": str(tmp_path / "cfg"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-1", "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret",
           "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "admin-password-1"}
    proc = subprocess.Popen([PYTHON, "-m", "mlops.cli", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "up",
                             "--no-prefect", "--auth", "--mlflow-port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = read_until(proc, "Approvals:", timeout=300)
        url = line.split()[1]
        assert url == f"http://127.0.0.1:{port + 1}"
        keys = httpx.get(f"{url}/keyring", timeout=10).json()["keys"]
        assert len(keys) == 1 and keys[0]["key_id"].startswith("ed25519:")
        assert httpx.post(f"{url}/decisions", json={}, timeout=10).status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
