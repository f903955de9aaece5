"""MetricBuffer against a real ``mlflow server`` that dies mid-run, and a child process killed by SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from ml.tracking.buffer import MetricBuffer, mlflow_batch_sender

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MLFLOW_BIN = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class MlflowServer:
    """One ``mlflow server`` process group on loopback; stop() kills the whole group."""

    def __init__(self, db: Path, port: int, log: Path) -> None:
        self.db, self.port, self.log = db, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [str(MLFLOW_BIN), "server", "--backend-store-uri", f"sqlite:///{self.db}",
                 "--default-artifact-root", self.db.parent.joinpath("artifacts").as_uri(),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self.started, timeout=90, what=f"mlflow server on {self.url} (log: {self.log})")

    def started(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"mlflow server exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
        return self.answers()

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        wait_until(lambda: not self.answers(), timeout=10, what="the server to stop answering")


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "m.db", free_port(), tmp_path / "server.log")
    srv.start()
    yield srv
    srv.stop()


def log_steps(buffer: MetricBuffer, steps) -> None:
    for step in steps:
        buffer.log("loss", 1.0 / (step + 1), step)
        buffer.log("acc", step / 1000.0, step)


def test_every_metric_reaches_the_store_across_a_server_restart(server, tmp_path, monkeypatch):
    # Fail fast while the server is down instead of retrying with backoff for minutes.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server.url)
    experiment_id = client.create_experiment("metric-buffer")
    run_id = client.create_run(experiment_id).info.run_id
    buffer = MetricBuffer(mlflow_batch_sender(client, run_id), tmp_path / "spool.jsonl", flush_interval=0.1,
                          max_batch=50, retry_interval=0.5, register_atexit=False)

    log_steps(buffer, range(0, 200))
    wait_until(lambda: buffer.counters().sent == 400, timeout=30, what="the first 400 points to be sent")

    server.stop()
    log_steps(buffer, range(200, 400))
    wait_until(lambda: buffer.counters().spooled == 400, timeout=30, what="the outage's points to be spooled")

    server.start()
    log_steps(buffer, range(400, 600))
    counters = buffer.close(timeout=60)

    assert counters.spool_backlog == 0 and counters.unflushed == 0 and counters.dropped == 0
    assert counters.sent + counters.replayed == 1200
    assert counters.replayed >= 400
    for key, expected in (("loss", lambda s: 1.0 / (s + 1)), ("acc", lambda s: s / 1000.0)):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(600))
        assert all(m.value == pytest.approx(expected(m.step)) for m in history)


CHILD = textwrap.dedent("""
    import json, sys, time
    from ml.tracking.buffer import MetricBuffer, install_signal_flush

    store_path, spool_path = sys.argv[1], sys.argv[2]

    def send(chunk):
        # The store is "down" for any chunk holding steps 1000-1999: that chunk and every one
        # after it must end up in the spool, the ones before it in the store file.
        if any(1000 <= r.step < 2000 for r in chunk):
            raise ConnectionError("store down")
        with open(store_path, "a") as f:
            f.write("".join(json.dumps(list(r)) + "\\n" for r in chunk))

    buffer = MetricBuffer(send, spool_path, flush_interval=3600, max_batch=100, retry_interval=3600)
    install_signal_flush(buffer)
    for step in range(5000):
        buffer.log("loss", step * 0.5, step)
    print("logged", flush=True)
    time.sleep(120)
""")


def test_sigterm_flushes_the_buffer_to_the_store_or_the_spool(tmp_path):
    store, spool = tmp_path / "store.jsonl", tmp_path / "spool.jsonl"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(store), str(spool)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "logged"
        child.send_signal(signal.SIGTERM)
        returncode = child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()

    assert returncode == -signal.SIGTERM
    sent = [json.loads(line) for line in store.read_text().splitlines()]
    spooled = [json.loads(line) for line in spool.read_text().splitlines()]
    # Chunk edges depend on thread timing, so the split point is anywhere up to step 1000.
    assert [r[3] for r in sent + spooled] == list(range(5000))
    assert 0 < len(spooled) and len(sent) <= 1000
    assert all(r[1] == r[3] * 0.5 for r in sent + spooled)
