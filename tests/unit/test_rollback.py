"""Rollback after a divergence, through the real train stage: a poisoned window of batches rolls
training back to the checkpoint before it once and training completes past it; data poisoned for
good stops after train.max_rollbacks with one line; a confirmed loss spike rolls back too."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ml.config import AnomalyConfig, TrainConfig
from ml.observe.anomaly import AnomalyMonitor
from ml.settings import CheckpointConfig
from ml.train.checkpoints import CheckpointContext
from ml.train.divergence import TrainingDiverged
from ml.train.loop import Callback, StepValues
from ml.train.rollback import LossSpikeRollback, RollbackFailed, RollbackRecord, Rollbacks, trouble_start
from ml.train.stage import train
from tests.conftest import REPO

FEATURES, CLASSES = 8, ("a", "b", "c")
ROWS, BATCH = 256, 16
PER_EPOCH = ROWS // BATCH


def write_split(directory, name, rows, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)) % 3
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(FEATURES)])
    frame["label"] = [CLASSES[i] for i in y]
    frame.to_parquet(directory / f"{name}.parquet", index=False)


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """A small prepared dataset: 256 training rows (16 batches of 16), 64 validation rows."""
    directory = tmp_path_factory.mktemp("processed")
    write_split(directory, "train", ROWS, 0)
    write_split(directory, "val", 64, 1)
    (directory / "schema.json").write_text(json.dumps(
        {"features": [f"f{i}" for i in range(FEATURES)], "classes": list(CLASSES), "source": "synthetic"}))
    return directory


def train_config(tmp_path, **overrides):
    base = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    base.update(hidden_sizes=[16], batch_size=BATCH, epochs=3, lr=0.01, model_dir=str(tmp_path / "model"),
                run_file=str(tmp_path / "run.json"), metrics_file=str(tmp_path / "metrics.json"),
                max_skipped_steps=3, restore_best=None)
    base.update(overrides)
    return TrainConfig(**base)


def checkpoints(tmp_path, every_steps=4):
    return CheckpointContext(CheckpointConfig(dir=str(tmp_path / "ckpt"), every_steps=every_steps, monitor=()),
                             fingerprint="f" * 16)


class Recorder:
    """A Tracker that keeps what it was given."""

    run_id = None

    def __init__(self):
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self.tags: dict[str, object] = {}

    def log_metric(self, key, value, step):
        self.metrics.setdefault(key, []).append((step, value))

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.log_metric(key, value, step)

    def log_params(self, params):
        pass

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_text(self, text, path):
        pass


class PoisonedBatches(Callback):
    """The training split's rows are all NaN while the loop reads batches ``start`` to ``end - 1``
    (counted over the whole run from 0): a poisoned window of the data, by position."""

    def __init__(self, x: np.ndarray, start: int, end: float) -> None:
        self.x, self.clean = x, x.copy()
        self.start, self.end = start, end

    def _next_batch(self, state) -> None:
        position = state.epoch * PER_EPOCH + state.batch_in_epoch
        self.x[:] = np.nan if self.start <= position < self.end else self.clean

    def on_train_start(self, state):
        self._next_batch(state)

    def on_step_end(self, state, step):
        self._next_batch(state)


def poison(start, end):
    return lambda model, optimizer, splits: [PoisonedBatches(splits.x_train, start, end)]


def test_a_poisoned_window_rolls_back_once_to_the_checkpoint_before_it_and_training_completes(processed, tmp_path,
                                                                                                  capsys):
    tracker = Recorder()
    # Batches 22, 23, 24 are poisoned: steps 23-25 are skipped, the third in a row diverges.
    result = train(train_config(tmp_path), processed, tracker, checkpoints=checkpoints(tmp_path),
                   hook_factory=poison(22, 25))
    (record,) = result.rollbacks
    # Checkpoints every 4 steps: the newest before step 23 is at step 20 (batch 20); the batches
    # read since (20..24, two clean ones before the poison) are skipped.
    assert (record["step"], record["start_step"], record["checkpoint_step"]) == (25, 23, 20)
    assert record["checkpoint"] == "epoch-0001-step-00000020" and record["batches_skipped"] == 5
    state = result.state
    assert state.epoch == 3 and [h["epoch"] for h in state.history] == [1, 2, 3]
    assert state.global_step == 3 * PER_EPOCH - 5 and state.skipped_steps == 3
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert all(math.isfinite(h["val_loss"]) for h in state.history) and state.history[-1]["val_accuracy"] > 0.5
    assert tracker.metrics["train/rollbacks"] == [(25, 1.0)]
    assert tracker.metrics["train/rollback_batches_skipped"] == [(25, 5.0)]
    assert tracker.tags["rollbacks"] == 1
    assert tracker.tags["rollback.1"] == "step 25 -> training/epoch-0001-step-00000020 (step 20), 5 batches skipped"
    assert "train: rollback 1 at step 25: restored training/epoch-0001-step-00000020" in capsys.readouterr().out


def test_data_poisoned_for_good_stops_after_max_rollbacks_in_one_line(processed, tmp_path):
    tracker = Recorder()
    with pytest.raises(RollbackFailed) as info:
        train(train_config(tmp_path, max_rollbacks=2), processed, tracker, checkpoints=checkpoints(tmp_path),
              hook_factory=poison(22, math.inf))
    message = str(info.value)
    assert "\n" not in message and "after 2 rollbacks (train.max_rollbacks: 2)" in message
    assert message.startswith("training diverged: 3 steps in a row")
    assert tracker.tags["rollbacks"] == 2 and [v for _, v in tracker.metrics["train/rollbacks"]] == [1.0, 2.0]
    assert not (tmp_path / "model").exists()


def test_without_a_checkpoint_before_the_trouble_divergence_is_one_line(processed, tmp_path):
    with pytest.raises(RollbackFailed, match=r"^training diverged: .*; no valid training checkpoint before step 3 "
                                             r"to roll back to") as info:
        train(train_config(tmp_path), processed, Recorder(), hook_factory=poison(2, 5))
    assert "\n" not in str(info.value)


def test_max_rollbacks_0_keeps_the_divergence_error(processed, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"^training diverged: 3 steps in a row up to step 25"):
        train(train_config(tmp_path, max_rollbacks=0), processed, Recorder(), checkpoints=checkpoints(tmp_path),
              hook_factory=poison(22, 25))


class ScaledBatches(PoisonedBatches):
    """The training rows are ``factor`` times larger while the loop reads batches in the window:
    finite, but a loss far above the run's."""

    def __init__(self, x, start, end, factor=30.0):
        super().__init__(x, start, end)
        self.factor = factor

    def _next_batch(self, state):
        position = state.epoch * PER_EPOCH + state.batch_in_epoch
        self.x[:] = self.clean * self.factor if self.start <= position < self.end else self.clean


def test_a_loss_spike_confirmed_under_action_rollback_rolls_back(processed, tmp_path):
    tracker = Recorder()
    anomaly = AnomalyConfig(action="rollback", loss_spike_window=10, loss_spike_zscore=3.0, loss_spike_persist=3,
                            loss_spike_min_increase=0.5, max_grad_norm=None)
    monitors = []

    def hooks(model, optimizer, splits):
        monitors.append(AnomalyMonitor(anomaly, tracker))
        return [ScaledBatches(splits.x_train, 30, 33), monitors[0]]

    result = train(train_config(tmp_path), processed, tracker, checkpoints=checkpoints(tmp_path),
                   hook_factory=hooks)
    (record,) = result.rollbacks
    # The spike begins at step 31 (batch 30) and is confirmed one step later (persist 3): training
    # goes on from batch 32, where the one poisoned batch left is a hard batch, not a spike.
    assert (record["start_step"], record["step"]) == (31, 32)
    assert record["checkpoint_step"] == 28 and record["batches_skipped"] == 32 - 28
    assert "loss rose to" in record["reason"] and "anomaly.action: rollback" in record["reason"]
    assert result.state.epoch == 3 and math.isfinite(result.state.history[-1]["val_loss"])
    assert tracker.tags["anomaly.loss_spike"] == 31


def test_the_monitor_raises_a_rollback_at_a_confirmed_spike_dated_at_its_start():
    cfg = AnomalyConfig(action="rollback", loss_spike_window=5, loss_spike_zscore=3.0, loss_spike_persist=3,
                        loss_spike_min_increase=0.1, max_grad_norm=None)
    monitor = AnomalyMonitor(cfg)
    losses = [1.0, 0.98, 1.01, 0.99, 1.0, 1.02, 0.99, 1.0, 10.0, 11.0, 10.5]
    values = [StepValues(step, 1, loss, 1.0) for step, loss in enumerate(losses, start=1)]
    with pytest.raises(LossSpikeRollback) as info:
        monitor.on_log(None, values)
    assert info.value.start_step == 9 and trouble_start(info.value) == 9
    assert "\n" not in str(info.value)
    # A NaN loss is the loop's to skip; under rollback the monitor only records it.
    AnomalyMonitor(cfg).on_log(None, [StepValues(1, 1, math.nan, math.nan)])


def test_trouble_starts_at_the_first_skipped_step_in_a_row():
    assert trouble_start(TrainingDiverged(step=12, consecutive=4)) == 9


def test_bad_max_rollbacks_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^max_rollbacks: expected an integer >= 0, got -1$"):
        Rollbacks(None, -1, None, model=torch.nn.Linear(1, 1), optimizer=torch.optim.SGD([torch.zeros(1)], lr=1),
                  generator=torch.Generator())


class Interrupted(Exception):
    pass


class CrashAfterRollback(Callback):
    """Ends the process (an exception) at the first step after a rollback."""

    def __init__(self):
        self.starts = 0

    def on_train_start(self, state):
        self.starts += 1

    def on_step_end(self, state, step):
        if self.starts > 1:
            raise Interrupted


def test_rollbacks_count_over_a_resume(processed, tmp_path):
    """The rollbacks are in the training checkpoints: interrupted after one rollback, the resumed
    training has one left of max_rollbacks 2, not two."""
    cfg = train_config(tmp_path, max_rollbacks=2)
    with pytest.raises(Interrupted):
        train(cfg, processed, Recorder(), hooks=[CrashAfterRollback()], checkpoints=checkpoints(tmp_path),
              hook_factory=poison(22, math.inf))
    tracker = Recorder()
    with pytest.raises(RollbackFailed, match="after 2 rollbacks"):
        train(cfg, processed, tracker, checkpoints=checkpoints(tmp_path), hook_factory=poison(22, math.inf))
    assert [v for _, v in tracker.metrics["train/rollbacks"]] == [2.0]


def test_loading_rollback_state_never_forgets_rollbacks_made_since():
    def rollbacks():
        return Rollbacks(None, 3, None, model=torch.nn.Linear(1, 1),
                         optimizer=torch.optim.SGD([torch.zeros(1)], lr=1), generator=torch.Generator())

    made = rollbacks()
    made.records = [RollbackRecord(1, 9, 7, "step-00000004", 4, 5, "why")]
    resumed = rollbacks()
    resumed.load_state_dict(made.state_dict())
    assert resumed.records == made.records
    before = made.state_dict()
    made.records.append(RollbackRecord(2, 12, 10, "step-00000008", 8, 4, "again"))
    made.load_state_dict(before)   # the checkpoint a rollback restores predates the rollback
    assert len(made.records) == 2
