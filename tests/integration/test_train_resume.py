"""The train stage with its checkpoints: resuming by itself, starting fresh when told, an anomaly
that stops training cleanly, and a resumed run that stops where the straight one does."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.conftest import run_module, small_params, write_params, write_settings

pytestmark = pytest.mark.slow


def train(project, *flags):
    done = run_module("tasks.train", *flags, cwd=project)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def weights(project):
    return load_file(str(project / "models/model/model.safetensors"))


def test_train_resumes_a_longer_run_exactly_and_fresh_on_request(project):
    assert run_module("tasks.prepare", cwd=project).returncode == 0
    write_params(project, small_params(train={"epochs": 2}))
    first = train(project)
    assert first["resume"] == "starting fresh: no training checkpoint"

    write_params(project, small_params(train={"epochs": 4}))
    resumed = train(project)
    assert resumed["resume"].startswith("resuming from checkpoint training/epoch-0002-step-00000040")
    resumed_weights = weights(project)
    history = json.loads((project / "reports/train_metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]

    straight = train(project, "--fresh")
    assert straight["resume"] == "starting fresh (--fresh)"
    straight_weights = weights(project)
    assert resumed_weights.keys() == straight_weights.keys()
    assert all(resumed_weights[k].equal(straight_weights[k]) for k in straight_weights)
    assert straight["final"] == resumed["final"]

    # A finished training of the same configuration is not resumed; another configuration neither.
    assert train(project)["resume"].startswith("starting fresh: newest checkpoint")
    write_params(project, small_params(train={"epochs": 4, "lr": 0.01}))
    assert "of another configuration" in train(project)["resume"]

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    run = client.get_run(resumed["run_id"])
    assert run.data.tags["resumed_from_checkpoint"] == "epoch-0002-step-00000040"
    milestones = sorted(p.name for p in (project / "checkpoints/milestone").iterdir())
    assert "best_val_accuracy" in milestones and "best_val_loss" in milestones


def test_an_anomaly_with_action_stop_ends_training_cleanly(project):
    assert run_module("tasks.prepare", cwd=project).returncode == 0
    write_params(project, small_params(anomaly={"action": "stop", "max_grad_norm": 1e-6}))
    summary = train(project)
    assert summary["stopped_early"]
    history = json.loads((project / "reports/train_metrics.json").read_text())
    assert len(history) == 1 and history[0]["step"] == 1 and 0 < history[0]["epoch"] < 1

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["anomaly.exploding_gradient"] == "1" and run.data.tags["stopped_early"]
    events = client.download_artifacts(summary["run_id"], "events/anomalies.jsonl", str(project))
    (event,) = [json.loads(line) for line in open(events)]
    assert event["kind"] == "exploding_gradient" and event["step"] == 1


def test_a_resumed_run_with_anomaly_stop_and_early_stopping_ends_where_the_straight_run_ends(project):
    """The callbacks that can end a run keep their state in the checkpoints: interrupted one epoch
    before early stopping ends it (one epoch of patience already spent), the resumed run stops at
    the same epoch, for the same reason, with the same weights."""
    assert run_module("tasks.prepare", cwd=project).returncode == 0

    def params(epochs):
        return small_params(anomaly={"action": "stop"},
                            train={"epochs": epochs, "lr": 0.03, "early_stopping_patience": 2})

    write_settings(project, checkpoint={"dir": "checkpoints-straight"})
    write_params(project, params(12))
    straight = train(project)
    history = json.loads((project / "reports/train_metrics.json").read_text())
    stop_epoch = history[-1]["epoch"]
    assert straight["stopped_early"].startswith("early stopping: val_loss has not improved") and 2 < stop_epoch < 12
    straight_weights = weights(project)

    write_settings(project, checkpoint={"dir": "checkpoints-interrupted"})
    write_params(project, params(stop_epoch - 1))     # ends one epoch short of the stop: the interruption
    assert train(project)["stopped_early"] is None
    write_params(project, params(12))
    resumed = train(project)
    assert resumed["resume"].startswith(f"resuming from checkpoint training/epoch-{stop_epoch - 1:04d}-step-")
    assert resumed["stopped_early"] == straight["stopped_early"] and resumed["final"] == straight["final"]
    assert json.loads((project / "reports/train_metrics.json").read_text()) == history
    resumed_weights = weights(project)
    assert all(resumed_weights[k].equal(straight_weights[k]) for k in straight_weights)
