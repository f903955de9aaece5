"""The train stage with ``train.distributed.nproc_per_node: 2``: it launches two gloo ranks under
torchrun, rank 0 alone tracks one MLflow run (on a real ``mlflow server``) and writes the model,
the ranks end with the same weights and the metrics are over both shards. A rank SIGKILLed
mid-step fails the run cleanly (one line, the MLflow run FAILED, no model), a rerun resumes from
the newest checkpoint to the weights of a straight two-rank run, bit for bit, and the pipeline goes
on to register that model. Asking for more ranks than cores, or for rollbacks on a loss spike that
rank 0 alone sees, is one line before any work."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from ml.checkpoint.manager import CheckpointManager
from ml.data.prepare import load_split
from ml.model.serialization import load_model
from ml.train.distributed import weights_digest
from ml.train.loop import evaluate_split
from tests.conftest import run_module, small_params, write_params, write_settings
from tests.integration.ddp_faults import KILL_AT_ENV
from tests.integration.test_metric_buffer_server import MlflowServer, free_port

pytestmark = pytest.mark.slow

ENV = {"GLOO_SOCKET_IFNAME": "lo"}
EPOCHS = 3
FACTORY = {"model": "factory", "model_factory": "tests.integration.ddp_faults:build"}
# the speed switches as written (train.optimize auto measures each run anew: the straight and the
# resumed run are compared bit for bit)
FIXED_SPEED = {"optimize": "off"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """data/ as the prepare stage writes it, once for the module."""
    root = tmp_path_factory.mktemp("prepared")
    write_params(root, small_params())
    done = run_module("tasks.prepare", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "data"


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(root / "m.db", free_port(), root / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, prepared, tracking_server) -> tuple[Path, dict]:
    """A two-rank training that runs straight through, tracked on the server: its project, summary."""
    project = make_project(tmp_path_factory.mktemp("straight"), prepared, "straight", **FACTORY)
    write_settings(project, tracking={"uri": tracking_server.url}, checkpoint={"every_steps": 4})
    return project, stage(project, "train")


def make_project(base: Path, prepared: Path, name: str, **train: object) -> Path:
    project = base / name
    project.mkdir()
    shutil.copytree(prepared, project / "data")
    write_params(project, small_params(train={"epochs": EPOCHS, "distributed": {"nproc_per_node": 2}, **FIXED_SPEED,
                                              **train}))
    return project


def stage(project: Path, name: str, env: dict | None = None) -> dict:
    done = run_module(f"tasks.{name}", cwd=project, env={**ENV, **(env or {})})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def train_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("mlops-pipeline")
    return client.search_runs([experiment.experiment_id], "tags.stage = 'train'", order_by=["attributes.start_time"])


def test_two_ranks_track_one_run_and_agree_on_the_weights(straight, tracking_server):
    project, summary = straight
    client = MlflowClient(tracking_uri=tracking_server.url)
    (run,) = train_runs(client)
    assert run.info.run_id == summary["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["train.distributed.nproc_per_node"] == "2"
    assert run.data.tags["ddp.world_size"] == "2"
    model = load_model(project / "models/model")
    assert run.data.tags["ddp.weights_digests"].split(",") == [weights_digest(model)] * 2

    # each rank trained on half of every epoch: the steps are those of one shard
    n = len(pd.read_parquet(project / "data/processed/train.parquet"))
    per_epoch = math.ceil(math.ceil(n / 2) / small_params()["train"]["batch_size"])
    history = json.loads((project / "reports/train_metrics.json").read_text())
    assert [(h["epoch"], h["step"]) for h in history] == [(e, e * per_epoch) for e in range(1, EPOCHS + 1)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == \
        list(range(1, EPOCHS * per_epoch + 1))
    # the validation metrics are over both ranks' shares: the whole split, as one process sees it
    x_val, y_val = load_split(project / "data/processed", "val")
    whole = evaluate_split(model, torch.from_numpy(x_val), torch.from_numpy(y_val))
    assert summary["final"]["val_accuracy"] == whole["accuracy"]
    assert summary["final"]["val_loss"] == pytest.approx(whole["loss"], rel=1e-6)  # float32 sums per shard

    with CheckpointManager(project / "checkpoints", read_only=True) as manager:
        newest = manager.latest("training")
        assert manager.describe("training", newest)["world_size"] == 2


def test_a_killed_rank_fails_the_run_cleanly_and_a_rerun_resumes_exactly(straight, prepared, tmp_path):
    straight, expected = straight
    killed = make_project(tmp_path, prepared, "killed", **FACTORY)
    write_settings(killed, checkpoint={"every_steps": 4})

    # rank 1 dies in its 15th forward pass: checkpoints of steps 4, 8, 10 (epoch 1) and 12 exist
    done = run_module("tasks.train", cwd=killed, env={**ENV, KILL_AT_ENV: "15"})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: train: distributed training failed: rank 1 was killed by SIGKILL; a rerun resumes from the newest "
        "valid checkpoint")
    assert not (killed / "models").exists() and not (killed / "reports/train_run.json").exists()
    store = f"sqlite:///{killed}/mlflow.db"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    (failed,) = train_runs(client)
    # rank 0 lost rank 1 in a collective, or torchrun's SIGTERM came first
    assert failed.info.status == "FAILED" and any(why in failed.data.tags["error"] for why in ("gloo", "RankStopped"))
    with CheckpointManager(killed / "checkpoints", read_only=True) as manager:
        assert manager.list("training")

    resumed = stage(killed, "train")
    assert resumed["resume"].startswith("resuming from checkpoint training/epoch-0001-step-00000012")
    assert [r.info.status for r in train_runs(client)] == ["FAILED", "FINISHED"]
    want, got = load_model(straight / "models/model").state_dict(), load_model(killed / "models/model").state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert resumed["final"] == expected["final"]
    assert json.loads((killed / "reports/train_metrics.json").read_text()) == \
        json.loads((straight / "reports/train_metrics.json").read_text())

    # the pipeline goes on from the distributed train stage as from a one-process one
    stage(killed, "evaluate")
    registered = stage(killed, "register")
    version = client.get_model_version(registered["model_name"], registered["version"])
    assert version.run_id == version.tags["source_run_id"] == resumed["run_id"]


@pytest.mark.parametrize(("name", "change", "line"), [
    ("many", lambda params, cores: params["train"]["distributed"].update(nproc_per_node=cores + 1),
     "train.distributed.nproc_per_node: expected at most {cores} (the CPU cores available on this machine), "
     "got {more}"),
    ("rollback", lambda params, cores: params["anomaly"].update(action="rollback"),
     "anomaly.action: expected warn or stop when train.distributed.nproc_per_node is above 1 (rank 0 alone "
     "watches the loss), got 'rollback'"),
], ids=["too-many-ranks", "rollback"])
def test_what_ranks_cannot_do_is_one_line_before_any_work(prepared, tmp_path, name, change, line):
    cores = len(os.sched_getaffinity(0))
    project = make_project(tmp_path, prepared, name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    change(params, cores)
    write_params(project, params)
    done = run_module("tasks.train", cwd=project, env=ENV)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: " + line.format(cores=cores, more=cores + 1)
    assert not (project / "mlflow.db").exists() and not (project / "checkpoints").exists()
