"""Local servers on loopback: `mlflow server` on the pipeline's store, a Prefect server, its worker.

Used by ``mlops up`` and by the integration tests, so both start the real components the same way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                 extra: list[str] | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:port over ``backend_uri``; returns once /health answers."""
    args = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri,
            "--default-artifact-root", Path(artifacts).resolve().as_uri(), "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1", *(extra or [])]
    # The GenAI job runner (seven huey worker processes) serves no stage of this pipeline.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    return start_server(args, f"http://127.0.0.1:{port}/health", 120, env, log)


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
                 log: Path | None = None) -> subprocess.Popen:
    """A process worker whose flow runs use this interpreter's environment (the project's venv)."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return _spawn([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
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
