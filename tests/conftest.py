"""Shared fixtures: a project directory in tmp with a small params.yaml (and, where a test needs
other runtime settings than the defaults, a settings.yaml), so each test works on its own files and
its own MLflow store, with relative paths as a user's checkout has them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# mlflow server's GenAI job runner (seven huey consumers per server) has no use here.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


def base_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def small_params(**overrides: dict) -> dict:
    """The repository's params with a short training run; ``overrides`` maps section -> {key: value}."""
    params = base_params()
    params["train"]["epochs"] = 3
    params["train"]["hidden_sizes"] = [32]
    params["register"]["min_test_accuracy"] = 0.5
    params["contract"]["path"] = str(REPO / params["contract"]["path"])  # the committed contract, from any directory
    for section, values in overrides.items():
        params[section].update(values)
    return params


def write_params(directory: Path, params: dict) -> Path:
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def write_settings(directory: Path, **sections: dict) -> Path:
    """``directory/settings.yaml`` with ``sections`` (section -> {key: value}); every other key keeps
    its default. Stages run in ``directory`` read it (see ml/settings.py)."""
    path = directory / "settings.yaml"
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """An MLflow SQLite file with its schema created once per session (the migrations take
    seconds); tests copy it to get a store of their own."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


# Where a process tracks and registers: the stages' in-process `mlflow.set_tracking_uri`/`set_registry_uri`
# also write MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI into the environment, which every process a later
# test starts would inherit (a registration would then land in another test's store).
_TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLOPS_TRACKING__URI", "MLOPS_FLOW_WORKSPACE", "MLOPS_PARENT_RUN_ID", "MLFLOW_RUN_ID",
                 "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


# ... and into MLflow's module globals, which an MlflowClient made for one tracking URI without a
# registry URI registers through: (module, attribute) of the tracking and the registry URI.
_MLFLOW_URI_GLOBALS = (("mlflow.tracking._tracking_service.utils", "_tracking_uri"),
                       ("mlflow.tracking._model_registry.utils", "_registry_uri"))


def _tracking_state() -> tuple[dict, dict]:
    """The tracking variables of the environment, and MLflow's URI globals (mlflow is imported by the
    tests that use it, not here: a module not imported yet has its globals at their None default)."""
    env = {k: os.environ.get(k) for k in _TRACKING_ENV}
    uris = {(module, name): getattr(sys.modules[module], name, None)
            for module, name in _MLFLOW_URI_GLOBALS if module in sys.modules}
    return env, uris


def _restore_tracking_state(saved: tuple[dict, dict]) -> None:
    env, uris = saved
    for module, name in _MLFLOW_URI_GLOBALS:
        if module in sys.modules:
            setattr(sys.modules[module], name, uris.get((module, name)))
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def mlflow_uri_environment():
    """Every test leaves the tracking environment (and MLflow's process-wide URIs) as it found it."""
    saved = _tracking_state()
    yield
    _restore_tracking_state(saved)


@pytest.fixture(scope="module", autouse=True)
def module_tracking_environment():
    """And every module: a module fixture that runs a stage in-process (before any test's own
    guard saves the environment) must not hand its store to the modules that follow it on the
    same worker."""
    saved = _tracking_state()
    yield
    _restore_tracking_state(saved)


@pytest.fixture(scope="session", autouse=True)
def approval_keys(tmp_path_factory):
    """Approvals made by tests (and the processes they start) sign with a key of the test session,
    never with the user's own under ~/.config/mlops-pipeline; a test may point elsewhere itself."""
    saved = {k: os.environ.get(k) for k in ("MLOPS_CONFIG_DIR", "MLOPS_APPROVAL_KEYRING")}
    os.environ["MLOPS_CONFIG_DIR"] = str(tmp_path_factory.mktemp("mlops-config"))
    os.environ.pop("MLOPS_APPROVAL_KEYRING", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def prefect_home(tmp_path_factory):
    """Flows a test runs (in-process or in the processes it starts) keep Prefect's state in a home
    of the session's own, never in the user's ~/.prefect; each pytest-xdist worker has its own, so
    two workers never contend for one ephemeral-server database."""
    saved = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    yield
    if saved is None:
        os.environ.pop("PREFECT_HOME", None)
    else:
        os.environ["PREFECT_HOME"] = saved


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for every flow test of the session (starting one takes ~10 s on
    2 cores, and two at once contend for the same SQLite database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty working directory with a small params.yaml; the test runs inside it."""
    write_params(tmp_path, small_params())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_module(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    """``python -m module args`` in ``cwd`` with the repository importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([PYTHON, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def shrink_params(project: Path, **train: object) -> dict:
    """Makes the params.yaml of a repository copy train briefly and register what it trains."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update({"epochs": 2, **train})
    params["register"]["min_test_accuracy"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def copy_repo(dest: Path) -> Path:
    """The tracked files of the repository (as a fresh clone has them), committed in a new git repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest
