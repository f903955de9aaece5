"""The stage entry points as dvc.yaml calls them, on the embedded SQLite store."""

import json

import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.conftest import run_module, small_params, write_params

pytestmark = pytest.mark.slow


def registered_versions(project):
    db = project / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    return client.search_model_versions("name = 'digits-classifier'")


def run_stages(project, *stages):
    for stage in stages:
        done = run_module(f"tasks.{stage}", cwd=project)
        if done.returncode != 0:
            return done
    return done


def test_stages_register_a_pending_version_with_lineage(project):
    done = run_stages(project, "prepare", "validate", "train", "evaluate", "register")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["status"] == "PendingManualApproval" and summary["version"] == "1"
    (version,) = registered_versions(project)
    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(version.run_id)
    assert version.tags["approval_status"] == "PendingManualApproval"
    assert version.tags["dataset_md5"] == run.data.tags["dataset_md5"]
    assert version.tags["dataset_md5"].endswith(".dir")
    assert {"git_commit", "source_run_id", "test_accuracy"} <= set(version.tags)
    assert run.data.params["train.lr"] == "0.003"
    assert {"val_accuracy", "train_loss", "test_accuracy", "test_macro_f1"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 3
    assert run.inputs.dataset_inputs[0].dataset.digest == version.tags["dataset_md5"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/confusion_matrix.png", "evaluation/predictions.csv"} <= artifacts
    assert client.list_artifacts(run.info.run_id, "data")[0].path == "data/validation.json"
    validate_run = client.search_runs([run.info.experiment_id], "tags.stage = 'validate'")[0]
    validated = {a.path for a in client.list_artifacts(validate_run.info.run_id, "data")}
    assert {"data/validation.json", "data/drift.json", "data/drift.png", "data/contract"} <= validated
    assert version.tags["contract_digest"] == validate_run.data.tags["contract_digest"]
    assert json.loads(version.tags["input_signature"])["classes"] == [str(i) for i in range(10)]
    assert not client.get_registered_model("digits-classifier").aliases
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert len(metrics["confusion_matrix"]) == 10 and set(metrics["per_class"]) == {str(i) for i in range(10)}


def assert_one_line_error(done, fragment):
    """One ``error:`` line naming the problem (a gate failure lists the broken expectations below it)."""
    assert done.returncode != 0
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert fragment in line, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("case, fragment", [
    ("missing raw file", "raw file missing.csv not found"),
    ("csv without label column", "label column 'label' not found"),
    ("non-numeric feature", "x.csv breaks the data contract"),
    ("header only", "no data rows in x.csv"),
    ("unknown params key", "train.learning_rate: unknown key"),
    ("negative learning rate", "train.lr: expected AdamW learning rate, > 0, got -0.1"),
])
def test_bad_input_stops_with_one_line_and_registers_nothing(project, case, fragment):
    params = small_params()
    if case == "csv without label column":
        pd.DataFrame({"f1": range(30), "f2": range(30)}).to_csv(project / "x.csv", index=False)
        params["data"]["source"] = "x.csv"
    elif case == "non-numeric feature":
        pd.DataFrame({"f1": range(30), "f2": ["a"] * 30, "label": [0, 1, 2] * 10}).to_csv(project / "x.csv", index=False)
        params["data"]["source"] = "x.csv"
    elif case == "header only":
        (project / "x.csv").write_text("f1,f2,label\n")
        params["data"]["source"] = "x.csv"
    elif case == "missing raw file":
        params["data"]["source"] = "missing.csv"
    elif case == "unknown params key":
        params["train"]["learning_rate"] = 0.1
    elif case == "negative learning rate":
        params["train"]["lr"] = -0.1
    write_params(project, params)
    done = run_stages(project, "prepare", "validate", "train", "evaluate", "register")
    assert_one_line_error(done, fragment)
    assert registered_versions(project) == []


def test_bad_data_stops_at_the_gate(project):
    assert run_stages(project, "prepare").returncode == 0
    path = project / "data/processed/train.parquet"
    frame = pd.read_parquet(path)
    frame.loc[:9, "pixel_5"] = None
    frame.to_parquet(path, index=False)
    done = run_module("tasks.validate", cwd=project)
    assert done.returncode == 3
    assert "error: data validation failed: 1 expectation(s) broken" in done.stderr
    assert "train.pixel_5: expect_column_values_to_not_be_null {}: 10 of" in done.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mlops-pipeline").experiment_id])
    assert [(r.data.tags["stage"], r.info.status) for r in runs] == [("validate", "FAILED"), ("prepare", "FINISHED")]
    assert runs[0].data.tags["error"].startswith("ValidationFailed: data validation failed")
    # The failed stage's console, traceback included, is on its run.
    log = client.download_artifacts(runs[0].info.run_id, "console/validate.log", str(project))
    assert "ValidationFailed" in open(log).read()
    assert registered_versions(project) == []


def test_quality_gate_refuses_registration(project):
    assert run_stages(project, "prepare", "validate", "train", "evaluate").returncode == 0
    write_params(project, small_params(register={"min_test_accuracy": 1.0}))
    done = run_module("tasks.register", cwd=project)
    assert_one_line_error(done, "not registered: test accuracy")
    assert done.returncode == 4
    assert registered_versions(project) == []
