"""The pipeline outgrown one machine, in a fresh copy of the repository: MLflow on PostgreSQL with
artifacts on S3 (moto) behind `mlflow server`, the DVC remote on S3, the Optuna study on PostgreSQL
tuned by two worker processes; then approve, promote, serve, and walk lineage from the endpoint to
the dataset whose files are in the S3 remote. A worker killed mid-trial is
tests/integration/test_tuning_workers.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml

from mlops import services
from tests.conftest import copy_repo, shrink_params
from tests.integration.pg_s3 import S3_CREDENTIALS, postgres, s3_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MODEL = "digits-classifier"


def env_of(project: Path) -> dict[str, str]:
    """A user's environment in ``project``: its own code first, S3 credentials for DVC, a Prefect home
    of its own, no settings from outside (``MLOPS_<SECTION>__<KEY>``); the session's approval keys stay."""
    env = {k: v for k, v in os.environ.items()
           if not (k.upper().startswith(("AWS_", "MLFLOW_TRACKING")) or (k.upper().startswith("MLOPS_") and "__" in k))}
    return {**env, **S3_CREDENTIALS, "PYTHONPATH": str(project), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(project.parent / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "AWS_EC2_METADATA_DISABLED": "true"}


def sh(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), cwd=project, env=env_of(project), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def tracking_server(postgres, s3_server, tmp_path_factory):  # noqa: F811
    """`mlflow server` on a migrated PostgreSQL database, artifacts proxied to an S3 bucket."""
    store = postgres.create_database("mlflow")
    services.upgrade_database(store)
    bucket = s3_server.create_bucket("mlflow")
    port = services.free_port()
    log = tmp_path_factory.mktemp("mlflow-server") / "mlflow.log"
    server = services.start_mlflow(store, f"s3://{bucket}/artifacts", port, log=log, env=s3_server.env)
    try:
        yield f"http://127.0.0.1:{port}", bucket
    finally:
        services.stop(server)


def test_tuned_with_two_workers_on_postgres_and_s3_then_served_with_lineage_to_the_s3_dataset(
        tmp_path, postgres, s3_server, tracking_server):  # noqa: F811
    uri, artifact_bucket = tracking_server
    data_bucket = s3_server.create_bucket("dvc")
    storage = postgres.create_database("optuna")
    project = copy_repo(tmp_path / "repo")
    params = shrink_params(project)
    params["tune"].update({"n_trials": 4, "storage": storage, "study_name": "e2e", "pruner": "none",
                           "space": {"lr": {"low": 0.01, "high": 0.05, "log": True},
                                     "batch_size": {"choices": [64, 128]}}})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    settings = yaml.safe_load((project / "settings.yaml").read_text())
    settings["tracking"]["uri"] = uri
    settings["serve"]["port"] = 0
    settings["data_remote"].update({"url": f"s3://{data_bucket}/dvc", "endpoint_url": s3_server.endpoint_url})
    (project / "settings.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    sh(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "team stores")

    sh(project, sys.executable, "-m", "flows.training")  # prepares, versions and pushes the data to S3
    tuned = sh(project, sys.executable, "-m", "flows.tuning", "--workers", "2")
    assert "Study e2e: best trial" in tuned.stdout, tuned.stdout[-2000:]

    study = optuna.load_study(study_name="e2e", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    workers = {t.user_attrs["tune_worker"] for t in study.trials}
    assert 1 <= len(workers) <= 2
    registered = json.loads((project / "reports" / "registered.json").read_text())
    version = registered["version"]
    assert version == "2"  # version 1 is the training flow's

    mlops = str(BIN / "mlops")
    sh(project, mlops, "models", "approve", MODEL, version, "--reason", "e2e", "--allow-self-approval")
    sh(project, mlops, "models", "promote", MODEL, version)
    server = subprocess.Popen([mlops, "serve"], cwd=project, env=env_of(project), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = ""
        while " at http" not in line:
            line = server.stdout.readline()
            assert line or server.poll() is None, "mlops serve exited before serving"
        url = line.rsplit(" at ", 1)[1].strip()
        with urllib.request.urlopen(url + "/info", timeout=10) as response:
            assert json.loads(response.read())["model_version"] == version
        lineage = json.loads(sh(project, mlops, "lineage", "endpoint", "digits", "--format", "json").stdout)
    finally:
        server.terminate()
        server.wait(timeout=30)

    assert not [n for n in lineage["nodes"] if n["missing"]], lineage
    runs = {n["run_kind"]: n for n in lineage["nodes"] if n["kind"] == "run"}
    assert {"trial", "tuning", "pipeline"} <= set(runs)
    best = study.best_trial
    assert runs["trial"]["optuna_trial"] == str(best.number)
    assert runs["trial"]["run_id"] == best.user_attrs["mlflow_run_id"]
    (dataset,) = [n for n in lineage["nodes"] if n["kind"] == "dataset"]
    md5 = dataset["md5"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert md5 == next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/processed")
    # the dataset is in the S3 remote, listing and files, and the served model's artifacts in the S3 store
    remote = s3_server.keys(data_bucket, "dvc/")
    assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in remote
    listing = project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    for entry in json.loads(listing.read_text()):
        assert f"dvc/files/md5/{entry['md5'][:2]}/{entry['md5'][2:]}" in remote
    artifacts = s3_server.keys(artifact_bucket, "artifacts/")
    assert any(best.user_attrs["mlflow_run_id"] in key and key.endswith("model.safetensors") for key in artifacts)
