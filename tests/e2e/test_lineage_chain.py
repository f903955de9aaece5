"""What a user does, in a fresh copy of the repository: run the pipeline, approve, promote, serve,
then ask which data produced the model the endpoint serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_repo, shrink_params

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def sh(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(list(args), cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_lineage_chain_is_complete_after_run_approve_promote_serve(tmp_path):
    project = copy_repo(tmp_path / "repo")
    shrink_params(project)
    settings = yaml.safe_load((project / "settings.yaml").read_text())
    settings["serve"]["port"] = 0
    (project / "settings.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"]):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()

    sh(project, sys.executable, "-m", "flows.training")
    mlops = str(BIN / "mlops")
    sh(project, mlops, "models", "approve", "digits-classifier", "1", "--reason", "e2e", "--allow-self-approval")
    sh(project, mlops, "models", "promote", "digits-classifier", "1")

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([mlops, "serve"], cwd=project, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = ""
        while " at http" not in line:
            line = server.stdout.readline()
            assert line or server.poll() is None, "mlops serve exited before serving"
        url = line.rsplit(" at ", 1)[1].strip()
        with urllib.request.urlopen(url + "/info", timeout=10) as response:
            info = json.loads(response.read())
        assert info["model_version"] == "1"
        lineage = json.loads(sh(project, mlops, "lineage", "endpoint", "digits", "--format", "json").stdout)
    finally:
        server.terminate()
        server.wait(timeout=30)

    nodes = {n["kind"]: n for n in lineage["nodes"]}
    assert not [n for n in lineage["nodes"] if n["missing"]], lineage
    assert {"endpoint", "model_version", "run", "dataset", "raw_source"} <= set(nodes)
    runs = [n for n in lineage["nodes"] if n["kind"] == "run"]
    assert {r["run_kind"] for r in runs} == {"stage", "pipeline"}
    pipeline = next(r for r in runs if r["run_kind"] == "pipeline")
    assert pipeline["prefect_flow_run_id"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    processed = next(o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/processed")
    assert nodes["dataset"]["md5"] == processed["md5"]
    assert nodes["dataset"]["git_commit"] == commit
    assert nodes["raw_source"]["label"].endswith("sklearn:digits")
    text = sh(project, mlops, "lineage", "endpoint", "digits").stdout
    assert "Approved" in text and processed["md5"] in text
