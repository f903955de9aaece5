"""A convolutional model through the registry: logged with its input shape in the MLmodel
metadata beside the flat signature, served through the endpoint's load-and-predict path, and
scored as the champion a challenger is compared with, like the MLP (whose exported program, with
its batch size dynamic, is what MLflow loads back for both)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow import MlflowClient

from ml.data.prepare import load_split
from registry import actions
from tests.conftest import run_module, small_params, write_params

pytestmark = pytest.mark.slow

MODEL = "digits-classifier"


def stages(project, *names):
    for name in names:
        done = run_module(f"tasks.{name}", cwd=project)
        assert done.returncode == 0, done.stderr[-3000:]


def test_a_cnn_is_logged_with_its_input_shape_served_and_compared_with_a_challenger(project, tmp_path):
    import mlflow
    import mlflow.artifacts
    from mlflow.models import Model

    from deploy.serve import load_version
    from registry.challenger import compare_with_champion

    write_params(project, small_params(train={"model": "cnn", "epochs": 2}))
    stages(project, "prepare", "train", "evaluate", "register")
    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    first = json.loads((project / "reports/registered.json").read_text())
    champion_accuracy = json.loads((project / "reports/metrics.json").read_text())["accuracy"]

    local = mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri(MODEL, first["version"]),
                                                dst_path=str(tmp_path / "download"), tracking_uri=uri)
    logged = Model.load(local)
    assert logged.metadata["input_shape"] == [1, 8, 8]
    assert logged.metadata["model_spec"]["name"] == "cnn" and logged.metadata["model_spec"]["input_shape"] == [1, 8, 8]
    assert list(logged.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 64]

    actions.approve_version(uri, MODEL, first["version"], "cnn champion", approver="bob")
    actions.promote_version(uri, MODEL, first["version"])
    served = load_version(client, uri, MODEL, first["version"])
    x_test, y_test = load_split(project / "data/processed", "test")
    classes, probabilities = served.predict(x_test)
    assert probabilities.shape == (len(x_test), 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    assert float((classes == y_test).mean()) == pytest.approx(champion_accuracy)

    # the register stage's gate, scoring the cnn champion on the test split
    mlflow.set_registry_uri(uri)
    gate = compare_with_champion(client, MODEL, 0.5, project / "data/processed", -1.0)
    assert gate.verdict == "passed" and gate.champion_version == first["version"]
    assert gate.champion_test_accuracy == pytest.approx(champion_accuracy)
