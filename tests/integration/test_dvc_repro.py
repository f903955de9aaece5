"""`dvc repro` on a copy of the repository: all stages, then a no-op, then only what a param touches."""

import subprocess

import pytest
import yaml

from ml.provenance import dir_md5
from tests.conftest import REPO, copy_repo, shrink_params

pytestmark = pytest.mark.slow

DVC = str(REPO / ".venv/bin/dvc") if (REPO / ".venv/bin/dvc").exists() else "dvc"


def repro(cwd):
    import os
    import sys
    from pathlib import Path

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([DVC, "repro"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")]


def test_repro_runs_all_then_nothing_then_only_what_changed(tmp_path):
    project = copy_repo(tmp_path / "repo")
    shrink_params(project)

    assert repro(project) == ["prepare", "validate", "train", "evaluate", "register"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    processed = next(o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/processed")
    assert processed["md5"] == dir_md5(project / "data/processed")
    assert repro(project) == []

    shrink_params(project, lr=0.002)
    assert repro(project) == ["train", "evaluate", "register"]
