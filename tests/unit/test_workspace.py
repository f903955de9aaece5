"""flows/workspace.py: the mode a flow run works in, the settings made absolute, and workspaces made
from a real git checkout (git and DVC on a temporary repository, no Prefect)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from flows.workspace import (
    WorkspaceError,
    absolute_tracking_uri,
    create_workspace,
    flow_workspace,
    remove_workspace,
    resolve_mode,
    settings_environment,
    workspace_root,
)

CHECKOUT = Path("/home/u/project")


@pytest.mark.parametrize(("mode", "deployment_run", "expected"), [
    ("auto", True, "worktree"), ("auto", False, "checkout"),
    ("checkout", True, "checkout"), ("worktree", False, "worktree"),
])
def test_mode(mode, deployment_run, expected):
    assert resolve_mode(mode, deployment_run) == expected


@pytest.mark.parametrize(("uri", "expected"), [
    ("sqlite:///mlflow.db", "sqlite:////home/u/project/mlflow.db"),
    ("sqlite:///../stores/mlflow.db", "sqlite:////home/u/stores/mlflow.db"),
    ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("postgresql+psycopg://u@db/mlflow", "postgresql+psycopg://u@db/mlflow"),
    ("mlruns", "file:///home/u/project/mlruns"),
    ("file:///srv/mlruns", "file:///srv/mlruns"),
])
def test_tracking_uri_relative_to_the_checkout(uri, expected):
    assert absolute_tracking_uri(uri, CHECKOUT) == expected


def _settings(uri="sqlite:///mlflow.db", artifact_root="mlartifacts", remote=None, autotune_cache=None,
              tensorboard=None):
    return SimpleNamespace(tracking=SimpleNamespace(uri=uri, artifact_root=artifact_root, spool_dir=".mlflow-spool",
                                                    tensorboard_dir=tensorboard),
                           data_remote=SimpleNamespace(url=remote),
                           checkpoint=SimpleNamespace(autotune_cache_dir=autotune_cache))


def test_settings_environment_makes_checkout_paths_absolute():
    env = settings_environment(_settings(remote="../dvc-remote"), CHECKOUT, {"MLOPS_SETTINGS": "conf/s.yaml"})
    assert env == {"MLOPS_TRACKING__URI": "sqlite:////home/u/project/mlflow.db",
                   "MLOPS_TRACKING__SPOOL_DIR": "/home/u/project/.mlflow-spool",
                   "MLOPS_TRACKING__ARTIFACT_ROOT": "/home/u/project/mlartifacts",
                   "MLOPS_DATA_REMOTE__URL": "/home/u/dvc-remote",
                   "MLOPS_SETTINGS": "/home/u/project/conf/s.yaml"}
    remote = settings_environment(_settings("http://h:5000", "s3://b/artifacts", "s3://b/dvc"), CHECKOUT, {})
    assert remote["MLOPS_TRACKING__URI"] == "http://h:5000"
    assert remote["MLOPS_TRACKING__ARTIFACT_ROOT"] == "s3://b/artifacts"
    assert "MLOPS_DATA_REMOTE__URL" not in remote and "MLOPS_SETTINGS" not in remote
    tb = settings_environment(_settings(tensorboard="tb"), CHECKOUT, {})
    assert tb["MLOPS_TRACKING__TENSORBOARD_DIR"] == "/home/u/project/tb"


def test_autotune_choices_outlive_the_workspace():
    """The workspaces' root holds train.optimize auto's cache unless the setting names a directory
    (relative: to the checkout)."""
    root = Path("/home/u/.cache/mlops-pipeline/workspaces")
    env = settings_environment(_settings(), CHECKOUT, {}, root)
    assert env["MLOPS_CHECKPOINT__AUTOTUNE_CACHE_DIR"] == str(root)
    env = settings_environment(_settings(autotune_cache="cache/autotune"), CHECKOUT, {}, root)
    assert env["MLOPS_CHECKPOINT__AUTOTUNE_CACHE_DIR"] == "/home/u/project/cache/autotune"
    assert "MLOPS_CHECKPOINT__AUTOTUNE_CACHE_DIR" not in settings_environment(_settings(), CHECKOUT, {})


def test_root(monkeypatch, tmp_path):
    assert workspace_root("../ws", CHECKOUT) == Path("/home/u/ws")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert workspace_root(None, CHECKOUT) == tmp_path / "mlops-pipeline" / "workspaces"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git checkout with a DVC project (no_scm, as the repository's), a file added with `dvc add`,
    and, uncommitted: a changed params.yaml, a new untracked file, an ignored output."""
    from dvc.repo import Repo

    repo = tmp_path / "checkout"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "params.yaml").write_text("train:\n  epochs: 30\n")
    (repo / ".gitignore").write_text("/models/\n/data/source.csv\n")  # DVC's line for it, written with git
    (repo / "data").mkdir()
    (repo / "data" / "source.csv").write_text("a,label\n1,0\n")
    with Repo.init(str(repo), no_scm=True) as dvc:
        dvc.add(str(repo / "data" / "source.csv"))
    (repo / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")  # what DVC writes with git
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    (repo / "params.yaml").write_text("train:\n  epochs: 2\n")
    (repo / "notes.md").write_text("untracked\n")
    (repo / "models").mkdir()
    (repo / "models" / "weights.bin").write_text("ignored\n")
    return repo


def test_workspace_is_the_checkout_as_the_user_left_it(checkout, tmp_path):
    head = git(checkout, "rev-parse", "HEAD").strip()
    ws = create_workspace(checkout, tmp_path / "root", "run-1")
    assert ws.path == (tmp_path / "root" / "run-1").resolve() and ws.commit == head
    assert git(ws.path, "rev-parse", "HEAD").strip() == head
    assert yaml.safe_load((ws.path / "params.yaml").read_text()) == {"train": {"epochs": 2}}
    assert (ws.path / "notes.md").read_text() == "untracked\n"
    assert not (ws.path / "models").exists()
    assert set(ws.copied) == {"params.yaml", "notes.md"}
    # the data added with `dvc add` is checked out from the checkout's cache, which the workspace shares
    assert (ws.path / "data" / "source.csv").read_text() == "a,label\n1,0\n"
    assert (ws.path / ".dvc" / "cache").resolve() == (checkout / ".dvc" / "cache").resolve()
    cached = {p.relative_to(checkout / ".dvc" / "cache") for p in (checkout / ".dvc" / "cache").rglob("*")}
    (ws.path / "data" / "new.txt").write_text("made in the workspace\n")
    from dvc.repo import Repo

    with Repo(str(ws.path)) as dvc:
        dvc.add(str(ws.path / "data" / "new.txt"))
        assert Path(dvc.site_cache_dir).is_relative_to(ws.path)  # removed with the workspace
    grown = {p.relative_to(checkout / ".dvc" / "cache") for p in (checkout / ".dvc" / "cache").rglob("*")}
    assert len(grown - cached) >= 1  # stored once, in the shared cache

    remove_workspace(ws)
    assert not ws.path.exists()
    assert git(checkout, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert grown == {p.relative_to(checkout / ".dvc" / "cache") for p in (checkout / ".dvc" / "cache").rglob("*")}
    assert git(checkout, "status", "--porcelain") == " M params.yaml\n?? notes.md\n"


def test_data_missing_from_cache_and_remote_is_one_line(checkout, tmp_path):
    import shutil

    shutil.rmtree(checkout / ".dvc" / "cache")
    with pytest.raises(WorkspaceError, match=r"data/source.csv.dvc is neither in the DVC cache nor on the DVC remote"):
        create_workspace(checkout, tmp_path / "root", "run-2")
    assert not (tmp_path / "root" / "run-2").exists()
    assert git(checkout, "worktree", "list", "--porcelain").count("worktree ") == 1


def test_not_a_git_checkout(tmp_path):
    with pytest.raises(WorkspaceError, match=r"is not a git checkout; expected one \(or workspace.mode: checkout\)$"):
        create_workspace(tmp_path, tmp_path / "root", "x")


def test_a_path_that_is_not_a_workspace_is_refused(checkout, tmp_path):
    (tmp_path / "root" / "taken").mkdir(parents=True)
    with pytest.raises(WorkspaceError, match=r"exists and is not a worktree of"):
        create_workspace(checkout, tmp_path / "root", "taken")


def test_flow_workspace_removed_on_success_kept_on_failure(checkout, tmp_path, monkeypatch, capsys, empty_store):
    import shutil

    from mlflow import MlflowClient

    shutil.copy(empty_store, checkout / "mlflow.db")
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("MLOPS_WORKSPACE__MODE", "worktree")
    monkeypatch.setenv("MLOPS_WORKSPACE__ROOT", str(tmp_path / "root"))
    monkeypatch.delenv("MLOPS_TRACKING__URI", raising=False)
    with flow_workspace() as ws:
        assert Path.cwd() == ws.path and ws.path.parent == tmp_path / "root"
        assert os.environ["MLOPS_TRACKING__URI"] == f"sqlite:///{checkout}/mlflow.db"
        assert os.environ["MLOPS_FLOW_WORKSPACE"] == str(ws.path)
        with flow_workspace() as nested:  # a subflow stays in its parent's workspace
            assert nested is None
    assert Path.cwd() == checkout and not ws.path.exists()
    # the store's experiment was made before the flow ran, artifacts in the checkout
    experiment = MlflowClient(f"sqlite:///{checkout}/mlflow.db").get_experiment_by_name("mlops-pipeline")
    assert experiment.artifact_location == (checkout / "mlartifacts").as_uri()
    assert "MLOPS_TRACKING__URI" not in os.environ and "MLOPS_FLOW_WORKSPACE" not in os.environ

    with pytest.raises(RuntimeError, match="stage failed"), flow_workspace() as failed:
        raise RuntimeError("stage failed")
    assert Path.cwd() == checkout and failed.path.is_dir()
    assert f"workspace {failed.path} kept for inspection" in capsys.readouterr().out
    remove_workspace(failed)


def test_checkout_mode_stays_in_the_checkout(checkout, monkeypatch):
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("MLOPS_WORKSPACE__MODE", "auto")
    with flow_workspace() as ws:
        assert ws is None and Path.cwd() == checkout
