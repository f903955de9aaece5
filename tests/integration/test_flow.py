"""The training pipeline as a Prefect flow, under a session-scoped test harness."""

import pytest
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.training import training_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def prefect_harness():
    # The ephemeral API takes ~10 s to come up on 2 cores; give it room.
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_runs_every_stage_and_returns_the_registered_version(prefect_harness, project):
    state = training_pipeline(params_path="params.yaml", version_data=False, return_state=True)
    assert state.is_completed(), state
    registered = state.result()
    assert registered["status"] == "PendingManualApproval" and registered["version"] == "1"
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    version = client.get_model_version("digits-classifier", "1")
    run = client.get_run(version.run_id)
    assert run.data.tags["prefect_flow_run_id"] == str(state.state_details.flow_run_id)
    for out in ("data/processed/train.parquet", "models/model/model.safetensors", "reports/metrics.json",
                "reports/registered.json"):
        assert (project / out).is_file(), out


def test_flow_fails_at_the_gate_and_registers_nothing(prefect_harness, project):
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["validate"]["feature_max"] = 10.0  # digits reach 16: the gate must stop the run
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    state = training_pipeline(params_path="params.yaml", version_data=False, return_state=True)
    assert state.is_failed()
    assert not (project / "models").exists() and not (project / "mlflow.db").exists()
