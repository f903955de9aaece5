"""`dvc repro` on one copy of the repository (as a fresh clone has it), after the training flow ran
there: nothing to reproduce and a clean `git status`; nothing after a runtime setting changes; only
train, evaluate and register after `train.lr` changes. One pipeline run for the module, one more
for the lr change (each costs ~30 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ml.provenance import dir_md5
from tests.conftest import copy_repo, shrink_params

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")


def env_of(project: Path) -> dict[str, str]:
    """A user's environment in ``project``: its own code on the import path, its own Prefect home,
    and no MLOPS_* setting from outside (the copy's settings.yaml is what it runs with)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MLOPS_")}
    return {**env, "PYTHONPATH": str(project), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(project.parent / "prefect-home"),
            # the flow's ephemeral Prefect API starts on cores the other test processes share
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def run(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), cwd=project, env=env_of(project), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def repro(project: Path) -> list[str]:
    """The stages `dvc repro` ran, in order."""
    done = run(project, DVC, "repro")
    return [line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")]


def dvc_status(project: Path) -> str:
    return run(project, DVC, "status").stdout.strip()


def git_status(project: Path) -> str:
    return run(project, "git", "status", "--porcelain", "--untracked-files=all").stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A repository copy with a short training committed, after `python -m flows.training`."""
    project = copy_repo(tmp_path_factory.mktemp("dvc") / "repo")
    shrink_params(project)
    run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "short training")
    assert not (project / "dvc.lock").exists()  # not committed: a fresh clone has none
    run(project, sys.executable, "-m", "flows.training")
    return project


def test_the_flow_leaves_a_clean_tree_and_nothing_to_reproduce(project):
    assert git_status(project) == ""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert list(lock["stages"]) == ["prepare", "validate", "train", "evaluate", "register"]
    processed = next(o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/processed")
    assert processed["md5"] == dir_md5(project / "data/processed")
    assert dvc_status(project) == "Data and pipelines are up to date."
    assert repro(project) == []
    assert git_status(project) == ""


def test_runtime_settings_reproduce_nothing(project):
    path = project / "settings.yaml"
    original = path.read_text()
    settings = yaml.safe_load(original)
    settings["tracking"].update({"progress": "off", "flush_interval_s": 0.25})
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    try:
        assert dvc_status(project) == "Data and pipelines are up to date."
        assert repro(project) == []
    finally:
        path.write_text(original)


def test_lr_reproduces_train_evaluate_register(project):
    before = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    shrink_params(project, lr=0.002)
    assert "train" in dvc_status(project)
    assert repro(project) == ["train", "evaluate", "register"]
    after = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert after["train"]["params"]["params.yaml"]["train.lr"] == 0.002
    assert after["prepare"] == before["prepare"] and after["validate"] == before["validate"]
    assert repro(project) == []
