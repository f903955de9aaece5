"""The data contract end to end, through the stage entry points dvc.yaml calls, `dvc repro` and the flow.

One project (a small table with named columns and its own contract) has a champion; dataset versions
that break the contract stop with their message, register nothing and leave the champion and
data/processed as they were; a compatible version registers a challenger scored against the champion
with the same label mapping; a renamed column is refused as a challenger unless
register.allow_breaking_change records it. Each subprocess costs ~15-40 s here, so the cases are few.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from ml.data.contract import infer_spec, write_contract
from tests.conftest import REPO, copy_repo, run_module, shrink_params, small_params, write_params
from tests.datasets import ANIMAL_CASES, animals

pytestmark = pytest.mark.slow

MODEL = "animals"


def processed_digest(project: Path) -> dict[str, str]:
    root = project / "data/processed"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())} if root.exists() else {}


def client_of(project: Path) -> MlflowClient:
    uri = f"sqlite:///{project}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def versions(project: Path) -> list[str]:
    return sorted(str(v.version) for v in client_of(project).search_model_versions(f"name = '{MODEL}'"))


def champion_version(project: Path) -> str:
    return str(client_of(project).get_model_version_by_alias(MODEL, "champion").version)


def stages(project: Path, *names: str) -> subprocess.CompletedProcess:
    for name in names:
        done = run_module(f"tasks.{name}", cwd=project)
        if done.returncode != 0:
            return done
    return done


def set_params(project: Path, **sections: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    write_params(project, params)


def error_line(done: subprocess.CompletedProcess) -> str:
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return line


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """animals.csv, its contract, and v1 trained, registered, approved and promoted to champion."""
    from registry import actions

    project = tmp_path_factory.mktemp("contract")
    animals().to_csv(project / "animals.csv", index=False)
    write_contract(project / "gx/expectations/animals.json", infer_spec(animals(), "species", MODEL, min_rows=5))
    write_params(project, small_params(
        data={"source": "animals.csv", "label_column": "species"},
        contract={"path": "gx/expectations/animals.json"}, validate={"max_class_fraction": 0.5},
        drift={"reference": "contract"}, train={"epochs": 30, "batch_size": 16, "lr": 0.01},
        register={"model_name": MODEL}))
    done = stages(project, "prepare", "validate", "train", "evaluate", "register")
    assert done.returncode == 0, done.stderr[-3000:]
    uri = f"sqlite:///{project}/mlflow.db"
    cwd = os.getcwd()
    os.chdir(project)
    try:
        actions.approve_version(uri, MODEL, "1", "first", allow_self_approval=True)
        actions.promote_version(uri, MODEL, "1")
    finally:
        os.chdir(cwd)
    return project


@pytest.mark.parametrize("case, exit_code", [("renamed column", 3), ("class absent", 3), ("header only", 2)])
def test_a_breaking_version_stops_at_prepare(project, case, exit_code):
    before = processed_digest(project)
    if case == "header only":
        (project / "animals.csv").write_text("length,weight,age,species\n")
        fragments = ("error: data.source: no data rows in animals.csv",)
    else:
        change, fragments = ANIMAL_CASES[case]
        change(animals()).to_csv(project / "animals.csv", index=False)
    try:
        done = run_module("tasks.prepare", cwd=project)
    finally:
        animals().to_csv(project / "animals.csv", index=False)
    assert done.returncode == exit_code, done.stderr[-3000:]
    line = error_line(done)
    assert line.startswith("error: data validation failed: animals.csv breaks the data contract") or \
        line.startswith("error: data.source")
    for fragment in fragments:
        assert fragment in done.stderr
    assert processed_digest(project) == before
    assert versions(project) == ["1"] and champion_version(project) == "1"


def test_drift_against_the_champions_training_split_from_the_dvc_cache(project):
    """The project's DVC cache holds the split the champion was trained on (`dvc add` puts it there,
    as the flows' `dvc commit` does)."""
    from dvc.repo import Repo

    from ml.provenance import dir_md5

    processed = project / "data/processed"
    md5 = client_of(project).get_model_version(MODEL, "1").tags["dataset_md5"]
    assert dir_md5(processed) == md5
    if not (project / ".dvc").is_dir():
        Repo.init(str(project), no_scm=True).close()
    with Repo(str(project)) as repo:
        repo.add(str(processed))
    (project / "data/processed.dvc").unlink()   # the cache keeps the files; the stages own data/processed
    set_params(project, drift={"reference": "champion"})
    try:
        done = run_module("tasks.validate", cwd=project)
    finally:
        set_params(project, drift={"reference": "contract"})
    assert done.returncode == 0, done.stderr[-3000:]
    drift = json.loads((project / "reports/drift.json").read_text())
    assert drift["reference"] == f"champion {MODEL} v1 (dataset {md5})"
    # every split of the same version against its own training split: no drift
    assert drift["level"] == "ok" and all(r["psi"] < 0.1 for r in drift["features"])


def test_a_compatible_version_registers_a_challenger_scored_with_the_same_mapping(project):
    import mlflow
    import numpy as np

    from ml.data.prepare import load_split
    from ml.model.predict import inference_model, predict
    from registry.challenger import load_registered_model

    animals().iloc[::-1].iloc[:-15].to_csv(project / "animals.csv", index=False)  # another version, same contract
    set_params(project, register={"champion_min_delta": -1.0})  # registered whichever model scores better
    try:
        done = stages(project, "prepare", "validate", "train", "evaluate", "register")
    finally:
        set_params(project, register={"champion_min_delta": 0.0})
        animals().to_csv(project / "animals.csv", index=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["champion_gate"]["verdict"] == "passed" and summary["champion_gate"]["champion_version"] == "1"
    version = client_of(project).get_model_version(MODEL, summary["version"])
    assert version.tags["champion_version"] == "1"
    assert json.loads(version.tags["input_signature"])["classes"] == ["cat", "dog", "emu"]
    assert version.tags["contract_digest"].startswith("sha256:")
    # the champion scored here, on the challenger's test split with the contract's mapping
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    mlflow.set_registry_uri(f"sqlite:///{project}/mlflow.db")
    champion = load_registered_model(MODEL, "1")
    x, y = load_split(project / "data/processed", "test")
    accuracy = float(np.mean(predict(inference_model(champion), x).classes == y))
    assert version.tags["champion_test_accuracy"] == f"{accuracy:.6f}"
    shown = run_module("mlops.cli", "models", "show", MODEL, summary["version"], cwd=project)
    assert f"vs champion v1 {accuracy:.4f}" in shown.stdout, shown.stdout + shown.stderr
    assert "classes (3): cat, dog, emu" in shown.stdout and "contract: gx/expectations/animals.json v1" in shown.stdout
    assert champion_version(project) == "1"


def test_a_schema_change_is_refused_unless_allowed_and_then_recorded(project):
    renamed = animals().rename(columns={"weight": "mass"})
    renamed.to_csv(project / "animals.csv", index=False)
    contract = project / "gx/expectations/animals.json"
    original = contract.read_text()
    write_contract(contract, infer_spec(renamed, "species", MODEL, min_rows=5, version=2))
    count = len(versions(project))
    try:
        done = stages(project, "prepare", "validate", "train", "evaluate", "register")
        assert done.returncode == 2
        assert error_line(done) == (f"error: not a challenger of {MODEL} v1: input columns differ: missing weight; "
                                    "new mass; a deliberate schema change needs register.allow_breaking_change: true")
        assert len(versions(project)) == count
        set_params(project, register={"allow_breaking_change": True})
        done = run_module("tasks.register", cwd=project)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        set_params(project, register={"allow_breaking_change": False})
        contract.write_text(original)
        animals().to_csv(project / "animals.csv", index=False)
    version = json.loads(done.stdout)["version"]
    record = client_of(project).get_model_version(MODEL, version)
    assert record.tags["champion_gate"] == "incomparable"
    assert "missing weight; new mass" in record.tags["breaking_change"]
    (event,) = json.loads(record.tags["approval_history"])
    assert event["breaking_change"] and "missing weight; new mass" in event["reason"]
    assert champion_version(project) == "1"


def test_the_flow_stops_with_one_line_and_no_traceback(project):
    (project / "animals.csv").write_text("")
    before = processed_digest(project)
    try:
        done = run_module("flows.training", "--no-version-data", cwd=project,
                          env={"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"})
    finally:
        animals().to_csv(project / "animals.csv", index=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert error_line(done) == "error: data.source: no data rows in animals.csv"
    assert processed_digest(project) == before and champion_version(project) == "1"
    runs = client_of(project).search_runs([client_of(project).get_experiment_by_name("mlops-pipeline").experiment_id],
                                          "tags.stage = 'prepare'", order_by=["attributes.start_time DESC"])
    log = client_of(project).download_artifacts(runs[0].info.run_id, "console/prepare.log", str(project))
    assert "Traceback" in Path(log).read_text() and "no data rows in animals.csv" in Path(log).read_text()


def test_dvc_repro_stops_at_prepare_and_writes_no_split(tmp_path):
    """The digits contract of a fresh clone against a digits file whose values are x100."""
    from ml.data.prepare import load_sklearn

    repo = copy_repo(tmp_path / "repo")
    shrink_params(repo)
    frame = load_sklearn("digits")
    frame[[c for c in frame.columns if c != "label"]] *= 100
    frame.to_csv(repo / "digits100.csv", index=False)
    set_params(repo, data={"source": "digits100.csv"})
    bin_dir = Path(sys.executable).parent
    env = {**{k: v for k, v in os.environ.items() if not k.upper().startswith("MLOPS_")}, "PYTHONPATH": str(repo),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([str(bin_dir / "dvc"), "repro"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode != 0
    assert "error: data validation failed: digits100.csv breaks the data contract gx/expectations/digits.json" in done.stderr
    assert "dataset.pixel_2: expect_column_values_to_be_between {'min_value': 0.0, 'max_value': 16.0}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (repo / "data/processed").exists() and not (repo / "models").exists()
