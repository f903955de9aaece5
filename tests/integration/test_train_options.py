"""The train stage with accumulation, clipping and a schedule: bad values end in one line before any
training, good ones train, log the rate and change the configuration's fingerprint."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from tests.conftest import run_module, small_params, write_params

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("train, message", [
    ({"warmup_steps": 1000}, "error: train.warmup_steps: expected fewer than the run's 60 optimizer steps"),
    ({"accumulate_steps": 0}, "train.accumulate_steps"),
    ({"schedule": "linear"}, "train.schedule"),
    ({"clip_grad_norm": 0}, "train.clip_grad_norm"),
], ids=["warmup-longer-than-run", "accumulate-0", "unknown-schedule", "clip-0"])
def test_bad_values_are_one_line_and_write_nothing(project, train, message):
    assert run_module("tasks.prepare", cwd=project).returncode == 0
    write_params(project, small_params(train=train))
    done = run_module("tasks.train", cwd=project)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == errors[0]
    assert not (project / "models/model").exists()


def test_accumulation_clipping_and_cosine_train_log_the_rate_and_checkpoint_at_step_boundaries(project):
    assert run_module("tasks.prepare", cwd=project).returncode == 0
    write_params(project, small_params(train={"accumulate_steps": 2, "clip_grad_norm": 1.0, "schedule": "cosine",
                                              "warmup_steps": 5}))
    done = run_module("tasks.train", cwd=project)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    history = json.loads((project / "reports/train_metrics.json").read_text())
    assert [h["step"] for h in history] == [10, 20, 30]          # 20 batches an epoch: 10 pairs
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    lr = [m.value for m in sorted(client.get_metric_history(summary["run_id"], "train/lr"), key=lambda m: m.step)]
    assert len(lr) == 30 and lr[5] == pytest.approx(0.003) and lr[0] == pytest.approx(0.003 / 6) and lr[-1] < 1e-4
    assert client.get_run(summary["run_id"]).data.params["train.accumulate_steps"] == "2"
    steps = sorted(int(p.name.rsplit("-step-", 1)[1]) for p in (project / "checkpoints/training").iterdir()
                   if "-step-" in p.name)
    assert steps and steps[-1] == 30

    # the same params with another accumulation are another configuration: no resume across them
    write_params(project, small_params(train={"accumulate_steps": 1, "clip_grad_norm": 1.0, "schedule": "cosine",
                                              "warmup_steps": 5, "epochs": 4}))
    again = run_module("tasks.train", cwd=project)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "of another configuration" in json.loads(again.stdout[again.stdout.index("{"):])["resume"]
