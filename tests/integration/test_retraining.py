"""`python -m flows.retraining` in a repository copy, against the session's Prefect test server and
moto's S3 server: unchanged data is skipped; a new dataset version (an S3 object) registers a
challenger compared with the champion on both test splits, emits ``mlops.data.new`` and leaves the
Markdown summary; drift beyond ``drift.psi_fail`` and an unreachable source register nothing. One
trained project for the module (the first retraining registers v1); the tests run in file order."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import copy_repo, shrink_params
from tests.integration.pg_s3 import S3_CREDENTIALS, s3_server  # noqa: F401

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MODEL = "digits-classifier"


@pytest.fixture(scope="module")
def api_url(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def env_of(project: Path, api_url: str, s3_endpoint: str) -> dict[str, str]:
    """A user's environment in ``project``: its code, the test Prefect server, S3 on moto, the
    session's approval keys and no other MLOPS_*/AWS_* setting from outside."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("MLOPS_", "AWS_", "PREFECT_")) or k == "MLOPS_CONFIG_DIR"}
    return {**env, **S3_CREDENTIALS, "AWS_ENDPOINT_URL_S3": s3_endpoint, "PYTHONPATH": str(project),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": api_url,
            "PREFECT_HOME": os.environ["PREFECT_HOME"]}


class Project:
    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path, self.env = path, env
        self.raw = pd.DataFrame()  # the digits as prepare wrote them for the first retraining

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=self.path, env=self.env, capture_output=True, text=True, timeout=600)

    def retrain(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "flows.retraining", *args)

    @property
    def client(self) -> MlflowClient:
        uri = f"sqlite:///{self.path}/mlflow.db"
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def versions(self) -> list[str]:
        return sorted(str(v.version) for v in self.client.search_model_versions(f"name = '{MODEL}'"))

    def last_pipeline_run(self):
        experiment = self.client.get_experiment_by_name("mlops-pipeline").experiment_id
        (run,) = self.client.search_runs([experiment], "tags.`mlops.retraining` = 'true'",
                                         order_by=["attributes.start_time DESC"], max_results=1)
        return run


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{done.args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a failed command, which printed no traceback."""
    lines = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory, api_url, s3_server) -> Project:  # noqa: F811
    """A repository copy with short training whose first retraining registered v1."""
    path = copy_repo(tmp_path_factory.mktemp("retrain") / "repo")
    shrink_params(path)
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["register"]["champion_min_delta"] = -1.0  # a challenger on new data registers whatever its score
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    project = Project(path, env_of(path, api_url, s3_server.endpoint_url))
    ok(project.run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "short retraining"))
    done = ok(project.retrain())
    assert "digits-classifier has no registered version yet" in done.stdout and project.versions() == ["1"]
    project.raw = pd.read_csv(path / "data/raw/digits.csv")
    return project


def wait_for_events(name: str, resource_id: str, deadline_s: float = 60) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    query = EventFilter(event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id]))
    deadline = time.monotonic() + deadline_s
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(filter=query, limit=10).events
            if events or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


def test_unchanged_data_is_skipped_and_registers_nothing(project):
    done = ok(project.retrain())
    assert "Skipped: nothing new: dataset" in done.stdout and f"equal those of {MODEL} v1" in done.stdout
    assert project.versions() == ["1"]
    run = project.last_pipeline_run()
    assert run.data.tags["retrain_decision"] == "skipped" and run.info.status == "FINISHED"
    assert "train_run_id" not in run.data.tags


def test_new_data_registers_a_challenger_compared_on_both_splits(project, s3_server, api_url):  # noqa: F811
    ok(project.run(str(BIN / "mlops"), "models", "approve", MODEL, "1", "--reason", "first",
                   "--allow-self-approval"))
    ok(project.run(str(BIN / "mlops"), "models", "promote", MODEL, "1"))
    champion_md5 = project.client.get_model_version(MODEL, "1").tags["dataset_md5"]
    raw = project.raw.copy()
    bucket = s3_server.create_bucket("landing")
    s3_server.client().put_object(Bucket=bucket, Key="digits/new.csv", Body=raw.iloc[150:].to_csv(index=False))

    done = ok(project.retrain("--source", f"s3://{bucket}/digits/new.csv"))
    assert "Completed: changed since digits-classifier v1 (champion): dataset" in done.stdout
    assert f"mlops models approve {MODEL} 2" in done.stdout and project.versions() == ["1", "2"]
    assert (project.path / "data/sources" / bucket / "digits/new.csv").is_file()
    tags = project.client.get_model_version(MODEL, "2").tags
    assert tags["approval_status"] == "PendingManualApproval" and tags["retrain_replaces"] == "1"
    assert tags["retrain_champion_test_dataset"] == champion_md5 != tags["retrain_new_test_dataset"]
    for split in ("new_test", "champion_test"):
        delta = float(tags[f"retrain_{split}_challenger_accuracy"]) - float(tags[f"retrain_{split}_champion_accuracy"])
        assert float(tags[f"retrain_{split}_delta"]) == pytest.approx(delta, abs=1e-6)
    run = project.last_pipeline_run()
    assert run.data.tags["retrain_decision"] == "retrained" and run.data.tags["registered_version"] == "2"
    assert {f"retrain/{s}/{w}_accuracy" for s in ("new_test", "champion_test")
            for w in ("champion", "challenger", "delta")} <= set(run.data.metrics)
    summary = Path(project.client.download_artifacts(run.info.run_id, "retraining/summary.md")).read_text()
    assert f"| champion_test | `{champion_md5}` |" in summary and "| champion | 1797 |" in summary
    assert f"mlops models reject {MODEL} 2" in summary

    listing = ok(project.run(str(BIN / "mlops"), "models", "list", MODEL)).stdout
    assert "would replace champion v1: new_test " in listing and "; champion_test " in listing

    from prefect.client.orchestration import get_client

    md5 = tags["dataset_md5"]
    (event,) = wait_for_events("mlops.data.new", f"mlops.dataset.{md5}")
    assert event.resource["mlops.source"] == f"s3://{bucket}/digits/new.csv"
    with get_client(sync_client=True) as client:
        artifacts = [a for a in client.read_artifacts() if a.key == "retraining-summary"]
    assert any(f"Registered {MODEL} v2" in a.data for a in artifacts)


def test_drift_beyond_the_fail_threshold_registers_nothing(project, tmp_path):
    before = project.versions()
    raw = project.raw.copy()
    raw["pixel_20"] = 16.0  # within the contract's range, far from every reference share
    raw.to_csv(tmp_path / "drifted.csv", index=False)
    done = project.retrain("--source", str(tmp_path / "drifted.csv"))
    assert done.returncode == 3, done.stderr[-3000:]
    assert "data validation failed: drift" in done.stderr and "pixel_20" in done.stderr
    assert project.versions() == before
    run = project.last_pipeline_run()
    assert run.info.status == "FAILED" and run.data.tags["retrain_decision"] == "failed"
    assert run.data.tags["retrain_reason"].startswith("data validation failed: drift")
    md5 = run.data.tags["dataset_md5"]
    assert wait_for_events("mlops.drift.detected", f"mlops.dataset.{md5}")


def test_an_unreachable_source_fails_in_one_line_and_registers_nothing(project, s3_server, tmp_path):  # noqa: F811
    before = project.versions()
    missing = tmp_path / "landing" / "missing.csv"
    assert error_line(project.retrain("--source", str(missing))) == f"error: source {missing}: no such file"
    bucket = s3_server.create_bucket("landing")
    line = error_line(project.retrain("--source", f"s3://{bucket}/digits/absent.csv"))
    assert line.startswith(f"error: source s3://{bucket}/digits/absent.csv: no such key at http://127.0.0.1:")
    assert project.versions() == before
    run = project.last_pipeline_run()
    assert run.info.status == "FAILED" and "no such key" in run.data.tags["retrain_reason"]


def test_the_nightly_deployment_runs_the_retraining_with_its_trigger_paused(project, api_url):
    """deploy/prefect.yaml applied as `mlops up` applies it: the deployment's entrypoint is this
    flow and its event trigger becomes an automation owned by it, disabled until a user enables it."""
    from prefect.client.orchestration import get_client

    from mlops import services

    services.deploy_flows(project.path, {"PREFECT_API_URL": api_url, "PYTHONPATH": str(project.path)})
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("training-pipeline/nightly-retrain")
        automations = client.read_automations_by_name("retrain-on-new-data")
    assert deployment.entrypoint == "flows/retraining.py:retraining_pipeline"
    assert deployment.parameter_openapi_schema["properties"].keys() == {"params_path", "source", "version_data", "retune"}
    (automation,) = automations
    assert automation.enabled is False and automation.trigger.expect == {"mlops.data.new"}
    assert automation.actions[0].deployment_id == deployment.id
