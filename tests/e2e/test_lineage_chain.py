"""What a user does, in a fresh copy of the repository: run the pipeline, approve, promote, serve,
then ask which data produced the model the endpoint serves, and what that dataset went into.
Every command imports the copy's own code (PYTHONPATH names the copy, never this checkout)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo, shrink_params

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def copy_env(project: Path) -> dict[str, str]:
    """The environment of a user working in ``project``: its own code first on the import path, and
    a Prefect home of its own (the ephemeral API's database is not shared with other test runs; its
    first start creates the database, which takes longer than Prefect's 20 s default on 2 busy cores)."""
    return {**os.environ, "PYTHONPATH": str(project), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(project.parent / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def sh(project: Path, *args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), cwd=cwd or project, env=copy_env(project), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


# A line on the terminal of a flow run: a flow or task run's line (the stages, what they print) or a
# record of the project's own loggers, in Prefect's console format.
RUN_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| [A-Z]+ +\| "
                      r"(Flow run '|Task run '|(ml|tasks|flows|registry|lineage|deploy|mlops)\.)")


def foreign_terminal_lines(output: str, result: str) -> list[str]:
    """Lines of a flow run's terminal output that are neither a stage's line nor the result and
    next commands (``result``, the block the flow's command prints last)."""
    expected = set(result.splitlines())
    return [line for line in output.splitlines() if line.strip() and not RUN_LINE.match(line) and line not in expected]


def test_the_lineage_chain_is_complete_after_run_approve_promote_serve(tmp_path):
    project = copy_repo(tmp_path / "repo")
    shrink_params(project)
    settings = yaml.safe_load((project / "settings.yaml").read_text())
    settings["serve"]["port"] = 0
    (project / "settings.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"]):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    # from outside the copy (as the console script runs: no working directory on the path)
    imported = sh(project, sys.executable, "-c", "import ml, mlops.cli, lineage; print(ml.__file__, "
                  "mlops.cli.__file__, lineage.__file__)", cwd=tmp_path).stdout.split()
    assert all(Path(f).is_relative_to(project) for f in imported), imported

    ran = sh(project, sys.executable, "-m", "flows.training")
    # The terminal is for people: other libraries' notices and warnings (GX per check, MLflow's
    # dataset-source and schema hints, DVC's lock file lines) are in the console logs of the runs;
    # Prefect's temporary server and MLflow's table creation are left out.
    result = ran.stdout[ran.stdout.index("Registered digits-classifier version 1"):]
    assert result.rstrip().endswith("# once serving: endpoint -> version -> run -> dataset"), ran.stdout[-2000:]
    assert not foreign_terminal_lines(ran.stdout + ran.stderr, result), foreign_terminal_lines(ran.stdout + ran.stderr,
                                                                                              result)
    assert re.search(r"Task run 'train-\w+' - Finished in state Completed", ran.stderr), ran.stderr[-2000:]
    (dvc_log,) = project.glob("mlartifacts/**/console/dvc-commit.log")  # on the pipeline run
    assert "Updating lock file 'dvc.lock'" in dvc_log.read_text()
    mlops = str(BIN / "mlops")
    sh(project, mlops, "models", "approve", "digits-classifier", "1", "--reason", "e2e", "--allow-self-approval")
    sh(project, mlops, "models", "promote", "digits-classifier", "1")
    version = json.loads(sh(project, mlops, "models", "show", "digits-classifier", "1", "--json").stdout)
    (approval,) = [e for e in version["history"] if e["to_status"] == "Approved"]
    assert approval["self_approval"] is True  # the run's author approved: the override is on record
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    processed = next(o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/processed")
    train_run = json.loads((project / "reports/train_run.json").read_text())["run_id"]

    server = subprocess.Popen([mlops, "serve"], cwd=project, env=copy_env(project), stdout=subprocess.PIPE,
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
        used = json.loads(sh(project, mlops, "lineage", "dataset", processed["md5"], "--format", "json").stdout)
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
    assert nodes["dataset"]["md5"] == processed["md5"]
    assert nodes["dataset"]["git_commit"] == commit
    assert nodes["raw_source"]["label"].endswith("sklearn:digits")
    text = sh(project, mlops, "lineage", "endpoint", "digits").stdout
    assert "Approved" in text and processed["md5"] in text

    # and from the dataset forwards, over the runs and tags the pipeline itself wrote
    edges = {(e["from"], e["relation"], e["to"]) for e in used["edges"]}
    dataset_id, run_id, version_id = f"dataset:{processed['md5']}", f"run:{train_run}", "version:digits-classifier/1"
    assert used["root"] == dataset_id and not [n for n in used["nodes"] if n["missing"]], used
    assert {(dataset_id, "used by", run_id), (dataset_id, "used by", f"run:{pipeline['run_id']}"),
            (run_id, "registered as", version_id), (version_id, "served by (now)", "endpoint:digits")} <= edges, edges
    assert {n["run_kind"] for n in used["nodes"] if n["kind"] == "run"} == {"stage", "pipeline"}
    dataset = next(n for n in used["nodes"] if n["id"] == dataset_id)
    assert dataset["git_commit"] == commit and dataset["source"] == "sklearn:digits"
