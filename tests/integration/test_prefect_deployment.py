"""`prefect deployment run 'training-pipeline/local'` against a real Prefect server and worker."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from mlops import services
from tests.conftest import copy_repo, shrink_params

pytestmark = pytest.mark.slow


def test_deployment_run_completes_and_registers_a_model(tmp_path):
    project = copy_repo(tmp_path / "repo")
    shrink_params(project)
    port = services.free_port()
    env = services.prefect_env(port, home=tmp_path / "prefect-home")
    server = services.start_prefect(port, home=tmp_path / "prefect-home", log=tmp_path / "server.log")
    worker = None
    try:
        services.deploy_flows(project, env)
        worker = services.start_worker(project, {**env, "PYTHONPATH": str(project),
                                                 "MLOPS_WORKSPACE__ROOT": str(tmp_path / "workspaces")},
                                       log=tmp_path / "worker.log")
        done = subprocess.run(
            [str(services.BIN / "prefect"), "deployment", "run", "training-pipeline/local", "--watch",
             "--watch-timeout", "400"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=450)
        worker_log = (tmp_path / "worker.log").read_text()[-4000:]
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + worker_log
        assert "Completed" in done.stdout
    finally:
        if worker is not None:
            services.stop(worker)
        services.stop(server)
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db", registry_uri=f"sqlite:///{project}/mlflow.db")
    (version,) = client.search_model_versions("name = 'digits-classifier'")
    assert version.tags["approval_status"] == "PendingManualApproval"
    # the flow run worked in its own workspace (flows/workspace.py): its dvc.lock is an artifact of its pipeline run
    (pipeline,) = client.search_runs([client.get_run(version.run_id).info.experiment_id],
                                     "tags.`mlops.run_kind` = 'pipeline'")
    lock_file = client.download_artifacts(pipeline.info.run_id, "dvc/dvc.lock", str(tmp_path))
    lock = yaml.safe_load(Path(lock_file).read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train.epochs"] == 2
