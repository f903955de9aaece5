"""Data on a DVC remote on S3 (moto's server on loopback): the training flow, with ``data_remote``
set, pushes what it committed; a fresh `git clone` with the same settings pulls, with
`mlops data-remote pull`, the exact data/processed the registered version was trained on, its md5
the version's lineage; a missing bucket stops the flow before any work, in one line, and a push the
remote refuses after registration fails the flow in one line naming the version and the bucket.
One pipeline run for the module (~30 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from ml.provenance import dir_md5
from tests.conftest import copy_repo, shrink_params
from tests.integration.pg_s3 import S3_CREDENTIALS, s3_server  # noqa: F401

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MODEL = "digits-classifier"
PREFIX = "pipeline-data"


def env_of(project: Path, **extra: str) -> dict[str, str]:
    """A user's environment in ``project``: its own code and Prefect home, S3 credentials, and no
    MLOPS_* setting from outside but ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("MLOPS_", "AWS_"))}
    return {**env, **S3_CREDENTIALS, "PYTHONPATH": str(project), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(project.parent / f"prefect-home-{project.name}"),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", **extra}


def run(project: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=project, env=env_of(project, **extra), capture_output=True, text=True,
                          timeout=600)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{done.args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a failed command, which printed no traceback."""
    lines = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    return lines[0]


def client_of(project: Path) -> MlflowClient:
    uri = f"sqlite:///{project}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def git_clone(source: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(source), str(dest)], check=True, capture_output=True)
    return dest


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:  # noqa: F811
    return s3_server.create_bucket("dvc")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, s3_server, bucket) -> tuple[Path, subprocess.CompletedProcess]:  # noqa: F811
    """A repository copy whose committed settings.yaml sets the remote, after `python -m flows.training`."""
    project = copy_repo(tmp_path_factory.mktemp("remote") / "trained")
    shrink_params(project)
    settings = yaml.safe_load((project / "settings.yaml").read_text())
    settings["data_remote"].update({"url": f"s3://{bucket}/{PREFIX}", "endpoint_url": s3_server.endpoint_url})
    (project / "settings.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    ok(run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "short training on a remote"))
    return project, ok(run(project, sys.executable, "-m", "flows.training"))


def test_the_flow_pushes_what_it_committed_and_logs_its_lock(trained, s3_server, bucket):  # noqa: F811
    project, done = trained
    lock_text = (project / "dvc.lock").read_text()
    lock = yaml.safe_load(lock_text)["stages"]
    cached = {o["path"]: o["md5"] for stage in lock.values() for o in stage["outs"] if o["md5"].endswith(".dir")}
    assert set(cached) == {"data/raw", "data/processed", "models/model"}
    keys = s3_server.keys(bucket, f"{PREFIX}/")
    for md5 in cached.values():
        assert f"{PREFIX}/files/md5/{md5[:2]}/{md5[2:]}" in keys
    listing = (project / ".dvc/cache/files/md5" / cached["data/processed"][:2] / cached["data/processed"][2:])
    for entry in yaml.safe_load(listing.read_text()):  # every file of the dataset, not only its listing
        assert f"{PREFIX}/files/md5/{entry['md5'][:2]}/{entry['md5'][2:]}" in keys
    assert f"files uploaded to DVC remote storage (s3://{bucket}/{PREFIX})" in done.stdout + done.stderr

    # the remote is this checkout's (.dvc/config.local, git-ignored): the committed config is untouched
    assert ok(run(project, "git", "status", "--porcelain")).stdout == ""
    local = (project / ".dvc/config.local").read_text()
    assert f"url = s3://{bucket}/{PREFIX}" in local and f"endpointurl = {s3_server.endpoint_url}" in local

    client = client_of(project)
    version = client.get_model_version(MODEL, "1")
    assert version.tags["dataset_md5"] == cached["data/processed"] == dir_md5(project / "data/processed")
    pipeline_id = client.get_run(version.run_id).data.tags["mlflow.parentRunId"]
    pipeline = client.get_run(pipeline_id)
    assert pipeline.data.tags["data_pushed"] == "true" and pipeline.data.tags["data_remote"] == f"s3://{bucket}/{PREFIX}"
    logged = client.download_artifacts(pipeline_id, "dvc/dvc.lock", str(project.parent / "logged-lock"))
    assert Path(logged).read_text() == lock_text


def test_a_fresh_clone_pulls_the_data_the_version_was_trained_on(trained, tmp_path):
    project, _ = trained
    clone = git_clone(project, tmp_path / "clone")
    assert not (clone / "dvc.lock").exists() and not (clone / "data").exists()
    store = f"sqlite:///{project}/mlflow.db"  # the team's tracking server, in a real deployment
    done = ok(run(clone, sys.executable, "-m", "mlops.cli", "data-remote", "pull", MODEL, "1",
                  MLOPS_TRACKING__URI=store))
    md5 = client_of(project).get_model_version(MODEL, "1").tags["dataset_md5"]
    assert dir_md5(clone / "data/processed") == md5
    assert done.stdout.startswith(f"data/processed: {md5} ({MODEL} version 1), ")
    assert (clone / "dvc.lock").read_text() == (project / "dvc.lock").read_text()
    for out in ("data/processed/train.parquet", "data/processed/test.parquet", "models/model/model.safetensors"):
        assert (clone / out).read_bytes() == (project / out).read_bytes(), out

    again = run(clone, sys.executable, "-m", "mlops.cli", "data-remote", "pull", MODEL, "2", MLOPS_TRACKING__URI=store)
    assert again.returncode == 2
    assert error_line(again) == f"error: model '{MODEL}' version 2: not found in the registry"


def test_a_missing_bucket_stops_the_flow_before_any_work(trained, tmp_path, s3_server):  # noqa: F811
    project, _ = trained
    clone = git_clone(project, tmp_path / "clone")
    done = run(clone, sys.executable, "-m", "flows.training", MLOPS_DATA_REMOTE__URL="s3://no-such-bucket-here/dvc")
    assert done.returncode == 2
    assert error_line(done) == (f"error: DVC remote storage bucket no-such-bucket-here at {s3_server.endpoint_url}: "
                                "no such bucket")
    assert not (clone / "data").exists() and not (clone / "dvc.lock").exists()
    assert not (clone / "mlflow.db").exists() or client_of(clone).search_runs(
        [e.experiment_id for e in client_of(clone).search_experiments()]) == []


def test_a_push_refused_after_registration_fails_the_flow_naming_the_version(trained, prefect_harness, monkeypatch,
                                                                            s3_server):  # noqa: F811
    """The push step of the flow against a bucket gone since the check (deleted, or credentials revoked):
    one line saying the version is registered and its data not pushed, and no retry of a refusal."""
    from flows.training import version_outputs
    from ml.dvc_remote import DataNotPushed
    from ml.settings import DataRemoteConfig, load_settings
    from ml.tracking.mlflow_tracker import MlflowTracker

    project, _ = trained
    monkeypatch.chdir(project)
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    gone = DataRemoteConfig(url="s3://deleted-bucket/dvc", endpoint_url=s3_server.endpoint_url)
    pipeline = MlflowTracker.start(load_settings().tracking, "pipeline", kind="pipeline", system_metrics=False)
    try:
        with pytest.raises(DataNotPushed) as err:
            version_outputs(pipeline, {"model_name": MODEL, "version": "1"}, gone)
    finally:
        pipeline.close("FAILED")
    assert str(err.value) == (
        f"{MODEL} version 1 is registered, but its data and model were not pushed to DVC remote storage "
        f"(s3://deleted-bucket/dvc): dvc push refused: DVC remote storage bucket deleted-bucket at "
        f"{s3_server.endpoint_url}: no such bucket; they are in this checkout's DVC cache: run `dvc push` once "
        "the remote takes them")
    assert err.value.exit_code == 5
    run_ = client_of(project).get_run(pipeline.run_id)
    assert run_.data.tags["data_pushed"] == "false"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        pushes = [t for t in prefect.read_task_runs() if t.name.startswith("dvc-push")]
    assert [t.run_count for t in pushes] == [1]  # a refusal is not retried


def test_a_deployment_run_checks_the_bucket_in_the_flow(trained, tmp_path, prefect_harness, monkeypatch,
                                                          s3_server):  # noqa: F811
    """A deployment starts the flow itself, without `python -m flows.training`'s check: the flow
    checks first thing too, and fails before its pipeline run exists."""
    from flows.training import training_pipeline
    from ml.dvc_remote import RemoteRefused

    project, _ = trained
    clone = git_clone(project, tmp_path / "clone")
    monkeypatch.chdir(clone)
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLOPS_DATA_REMOTE__URL", "s3://no-such-bucket-here/dvc")
    state = training_pipeline(return_state=True)
    assert state.is_failed()
    refused = state.result(raise_on_failure=False)
    assert isinstance(refused, RemoteRefused)
    assert str(refused) == f"DVC remote storage bucket no-such-bucket-here at {s3_server.endpoint_url}: no such bucket"
    assert not (clone / "mlflow.db").exists() and not (clone / "data").exists()
