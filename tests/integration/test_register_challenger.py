"""The champion/challenger gate of the register stage, on the embedded SQLite store.

The champion is a real registered PyTorch model whose accuracy is known by construction: an MLP
that answers class 0 when one pixel is bright and class 7 otherwise. That rule scores differently
on the test, validation and training splits, so a champion scored on any split but the test split
fails the test.
"""

import json

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from ml.data.contract import ContractError
from ml.data.prepare import load_split
from ml.errors import QualityGateFailed
from ml.model.architectures import MLP, ModelSpec
from registry import actions, store
from tests.conftest import run_module, small_params, write_params

pytestmark = pytest.mark.slow

MODEL = "digits-classifier"


def constant_model(in_features: int) -> MLP:
    """Predicts class 0 for every input."""
    model = MLP(ModelSpec(in_features, (4,), 10, 0.0))
    with torch.no_grad():
        for parameter in model.net.parameters():
            parameter.zero_()
        model.net[-1].bias[0] = 1.0
    return model.eval()


# Pixel 21 brighter than 10.5 means class 0, otherwise class 7: with the seed-42 digits splits
# this scores about 0.139 on the test split, 0.089 on validation and 0.102 on training.
RULE = {"feature": 21, "threshold": 10.5, "bright": 0, "otherwise": 7}


def threshold_model(in_features: int, feature: int, threshold: float, bright: int, otherwise: int) -> MLP:
    """Predicts ``bright`` where ``x[feature] > threshold + 0.5`` and ``otherwise`` where
    ``x[feature] <= threshold`` (the digits' pixels are whole numbers, so nothing falls between)."""
    model = MLP(ModelSpec(in_features, (1,), 10, 0.0))
    with torch.no_grad():
        for parameter in model.net.parameters():
            parameter.zero_()
        model.net[0].weight[0, feature] = 1.0
        model.net[0].bias[0] = -threshold
        model.net[-1].weight[bright, 0] = 10.0  # >= 5 once the pixel is above the threshold by 0.5
        model.net[-1].bias[otherwise] = 1.0
    return model.eval()


def rule_accuracy(x: np.ndarray, y: np.ndarray, feature: int, threshold: float, bright: int, otherwise: int) -> float:
    return float((np.where(x[:, feature] > threshold, bright, otherwise) == y).mean())


def register_champion(project, model: MLP) -> str:
    """Logs ``model`` as a run authored by alice, registers, approves and promotes it."""
    import mlflow
    import mlflow.pytorch

    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("mlops-pipeline").experiment_id
    run = client.create_run(experiment, tags={"mlflow.user": "alice", "stage": "train"})
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(run_id=run.info.run_id):
        example = np.zeros((4, model.spec.in_features), dtype=np.float32)
        info = mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=["torch"])
    version = store.register_version(client, MODEL, info.model_uri, run.info.run_id, {}).version
    actions.approve_version(uri, MODEL, version, "baseline", approver="bob")
    actions.promote_version(uri, MODEL, version)
    return version


def set_min_delta(project, delta):
    write_params(project, small_params(register={"min_test_accuracy": 0.5, "champion_min_delta": delta}))


def test_challenger_is_compared_with_the_champion_on_the_same_test_set(project):
    from tasks.register import run as register

    for stage in ("prepare", "validate", "train", "evaluate"):
        done = run_module(f"tasks.{stage}", cwd=project)
        assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db", registry_uri=f"sqlite:///{project}/mlflow.db")
    challenger_accuracy = json.loads((project / "reports/metrics.json").read_text())["accuracy"]
    run_id = json.loads((project / "reports/train_run.json").read_text())["run_id"]

    write_params(project, small_params(register={"min_test_accuracy": 1.0}))
    with pytest.raises(QualityGateFailed, match="not registered: test accuracy .* is below register.min_test_accuracy"):
        register("params.yaml")
    tags = client.get_run(run_id).data.tags
    assert tags["quality_gate"].startswith("failed: test accuracy") and "register_refused" in tags
    assert not client.search_registered_models()

    set_min_delta(project, 0.0)
    first = register("params.yaml")
    assert first["version"] == "1" and first["champion_gate"]["verdict"] == "no_champion"
    assert store.get_version(client, MODEL, "1").tags["champion_gate"] == "no_champion"

    champion_version = register_champion(project, threshold_model(64, **RULE))
    splits = {name: load_split(project / "data/processed", name) for name in ("train", "val", "test")}
    accuracy = {name: rule_accuracy(x, y, **RULE) for name, (x, y) in splits.items()}
    champion_accuracy = accuracy["test"]
    # the premise: scored on another split, the champion's accuracy would show in every check below
    assert min(abs(champion_accuracy - accuracy["val"]), abs(champion_accuracy - accuracy["train"])) > 0.01, accuracy

    # A challenger must beat the champion by 0.95: impossible, since the champion scores ~0.14.
    set_min_delta(project, 0.95)
    done = run_module("tasks.register", cwd=project)
    assert done.returncode == 4
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: not registered: challenger test accuracy ")
    assert f"{challenger_accuracy:.4f}" in line and f"champion v{champion_version}'s {champion_accuracy:.4f}" in line
    assert "below register.champion_min_delta +0.9500" in line
    assert sorted(int(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")) == [1, 2]
    tags = client.get_run(run_id).data.tags
    assert tags["champion_gate"] == "failed" and tags["champion_version"] == champion_version
    assert float(tags["champion_test_accuracy"]) == pytest.approx(champion_accuracy, abs=1e-6)
    assert tags["register_refused"].startswith("challenger test accuracy")
    assert store.champion(client, MODEL).version == champion_version

    set_min_delta(project, 0.0)
    summary = register("params.yaml")
    gate = summary["champion_gate"]
    assert gate["verdict"] == "passed" and gate["champion_version"] == champion_version
    assert gate["champion_test_accuracy"] == pytest.approx(champion_accuracy)
    assert gate["delta"] == pytest.approx(challenger_accuracy - champion_accuracy)
    assert json.loads((project / "reports/registered.json").read_text())["champion_gate"] == gate
    version = store.get_version(client, MODEL, summary["version"])
    assert version.status == "PendingManualApproval"
    assert (version.tags["champion_gate"], version.tags["champion_version"]) == ("passed", champion_version)
    assert float(version.tags["champion_delta"]) == pytest.approx(gate["delta"], abs=1e-6)
    tags = client.get_run(run_id).data.tags
    assert tags["registered_version"] == f"{MODEL}/{summary['version']}" and "register_refused" not in tags
    assert store.champion(client, MODEL).version == champion_version

    # A champion trained on other features cannot score this test set: refused, unless the break is
    # declared (register.allow_breaking_change), then registered as incomparable for the approver.
    other = register_champion(project, constant_model(10))
    with pytest.raises(ContractError, match=f"^champion {MODEL} v{other} cannot score the test split of "):
        register("params.yaml")
    assert client.get_run(run_id).data.tags["register_refused"].startswith(f"champion {MODEL} v{other} cannot")
    write_params(project, small_params(register={"min_test_accuracy": 0.5, "allow_breaking_change": True}))
    summary = register("params.yaml")
    assert summary["champion_gate"]["verdict"] == "incomparable"
    assert summary["champion_gate"]["champion_version"] == other
    assert store.get_version(client, MODEL, summary["version"]).tags["champion_gate"] == "incomparable"

