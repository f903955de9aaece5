"""The training pipeline as a Prefect flow, under a session-scoped test harness."""

import pytest
from mlflow import MlflowClient

from flows.training import training_pipeline

pytestmark = pytest.mark.slow


def test_flow_runs_every_stage_and_returns_the_registered_version(prefect_harness, project):
    state = training_pipeline(params_path="params.yaml", version_data=False, return_state=True)
    assert state.is_completed(), state
    registered = state.result()
    assert registered["status"] == "PendingManualApproval" and registered["version"] == "1"
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db", registry_uri=f"sqlite:///{project}/mlflow.db")
    version = client.get_model_version("digits-classifier", "1")
    run = client.get_run(version.run_id)
    flow_run_id = str(state.state_details.flow_run_id)
    assert run.data.tags["prefect_flow_run_id"] == flow_run_id
    # Experiment -> pipeline run -> one nested run per stage; the flow run links to the pipeline run.
    pipeline = client.get_run(registered["pipeline_run_id"])
    assert pipeline.data.tags["mlops.run_kind"] == "pipeline" and pipeline.info.status == "FINISHED"
    assert pipeline.data.tags["prefect_flow_run_id"] == flow_run_id
    assert pipeline.data.tags["registered_version"] == "1" and pipeline.data.params["train.lr"] == "0.003"
    children = client.search_runs([pipeline.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{pipeline.info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in children) == ["evaluate", "prepare", "register", "train", "validate"]
    assert run.data.tags["mlflow.parentRunId"] == pipeline.info.run_id
    assert all(client.list_artifacts(r.info.run_id, "console") for r in children)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        links = [a for a in prefect.read_artifacts() if a.key == "mlflow-pipeline-run"]
    assert any(pipeline.info.run_id in a.data and str(a.flow_run_id) == flow_run_id for a in links)
    for out in ("data/processed/train.parquet", "models/model/model.safetensors", "reports/metrics.json",
                "reports/registered.json"):
        assert (project / out).is_file(), out

    # train.optimize auto chose on the first run and cached its choice; retune measures again
    assert run.data.tags["autotune.cached"] == "false"
    again = training_pipeline(params_path="params.yaml", version_data=False, retune=True, return_state=True)
    assert again.is_completed(), again
    retuned = client.get_run(client.get_model_version("digits-classifier", again.result()["version"]).run_id)
    assert retuned.data.tags["autotune.cached"] == "false"


def test_flow_fails_at_the_gate_and_registers_nothing(prefect_harness, project):
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["validate"]["max_class_fraction"] = 0.06  # every digit is ~10% of the rows: the gate must stop the run
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    state = training_pipeline(params_path="params.yaml", version_data=False, return_state=True)
    assert state.is_failed()
    assert not (project / "models").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db", registry_uri=f"sqlite:///{project}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mlops-pipeline").experiment_id])
    assert {(r.data.tags.get("stage", "pipeline"), r.info.status) for r in runs} == {
        ("pipeline", "FAILED"), ("prepare", "FINISHED"), ("validate", "FAILED")}
    assert client.search_registered_models() == []
