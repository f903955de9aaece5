"""`mlops up` stops everything it started on SIGTERM and SIGHUP, as it does on Ctrl-C: no server,
worker or gunicorn/uvicorn child is left holding a port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import psutil
import pytest

from mlops.services import free_port
from tests.conftest import PYTHON, copy_repo

pytestmark = pytest.mark.slow


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float) -> list[str]:
    """Reads the child's stdout until a line contains ``text``; fails if it exits first."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise AssertionError(f"mlops up exited with {proc.returncode}: {''.join(lines)}")
            continue
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no {text!r} within {timeout} s: {''.join(lines)}")


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if alive:
            time.sleep(0.2)
    return alive


@pytest.mark.parametrize("signum, prefect", [(signal.SIGTERM, True), (signal.SIGHUP, False)],
                         ids=["sigterm-full-stack", "sighup-mlflow-only"])
def test_signal_stops_every_server_it_started(tmp_path, signum, prefect):
    project = copy_repo(tmp_path / "repo")
    mlflow_port, prefect_port = free_port(), free_port()
    args = [PYTHON, "-m", "mlops.cli", "up", "--mlflow-port", str(mlflow_port), "--prefect-port", str(prefect_port)]
    if not prefect:
        args.append("--no-prefect")
    env = {**os.environ, "PYTHONPATH": str(project), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for_line(proc, "stops everything", timeout=300)
        started = [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
        # the servers run in sessions of their own: their children are found through them
        for pid in list(started):
            try:
                started += [c.pid for c in psutil.Process(pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        started = sorted(set(started))
        assert len(started) >= (4 if prefect else 2), started  # mlflow + its app server at least
        assert _port_open(mlflow_port)
        if prefect:
            assert _port_open(prefect_port)

        proc.send_signal(signum)
        assert proc.wait(timeout=120) == 0
        assert _wait_gone(started, timeout=30) == []
        assert not _port_open(mlflow_port)
        assert not _port_open(prefect_port)
        assert "Stopped." in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
