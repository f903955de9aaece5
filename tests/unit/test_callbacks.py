"""Early stopping: the one patience rule, over a table of metric series, and in the real loop."""

import json
import math

import pytest
import torch

from ml.errors import ConfigError
from ml.train.callbacks import EarlyStopping
from ml.train.loop import Callback, LoopState, fit, seed_everything

NAN = math.nan


def run(stopper, values):
    """Feeds one value per epoch as fit would; returns the epoch training stopped at (None: never)."""
    state = LoopState()
    for value in values:
        state.epoch += 1
        stopper.on_epoch_end(state, {stopper.metric: value, "other": 0.0})
        if state.stop:
            return state.epoch
    return None


@pytest.mark.parametrize("metric, values, patience, stops_at", [
    ("val_loss", [5.0, 4.0, 3.0, 2.0, 1.0], 1, None),                  # always improving
    ("val_loss", [1.0, 1.0, 1.0, 1.0], 3, 4),                          # equal is no improvement
    ("val_loss", [3.0, 2.0, 2.5, 1.0, 1.5, 1.2, 1.1], 3, 7),            # the count restarts at each new best
    ("val_loss", [2.0, 1.0], 1, None),
    ("val_loss", [1.0, 1.0], 1, 2),
    ("val_accuracy", [0.5, 0.6, 0.6, 0.55, 0.6], 3, 5),                # accuracy improves upwards (ml.metrics)
    ("val_accuracy", [0.5, 0.4, 0.3], 2, 3),
    ("val_loss", [1.0, NAN, NAN, NAN], 3, 4),                          # NaN never improves
    ("val_loss", [NAN, NAN], 2, 2),                                    # nothing finite at all
], ids=["improving", "flat", "recovery", "patience-1-improving", "patience-1-flat", "max-metric", "max-falling",
        "nan", "all-nan"])
def test_stops_after_patience_epochs_without_improvement(metric, values, patience, stops_at):
    assert run(EarlyStopping(patience, metric), values) == stops_at


def test_stop_reason_names_the_metric_its_best_and_the_wait():
    stopper, state = EarlyStopping(2, "val_loss"), LoopState()
    for epoch, value in enumerate([0.5, 0.7, 0.6], start=1):
        state.epoch = epoch
        stopper.on_epoch_end(state, {"val_loss": value})
    assert state.stop and state.stop_reason == ("early stopping: val_loss has not improved on 0.5 (epoch 1) "
                                                "for 2 epochs; latest 0.6")


def test_state_round_trip_keeps_the_count():
    first = EarlyStopping(3, "val_loss")
    assert run(first, [1.0, 0.9, 0.95, 0.93]) is None                  # two epochs waiting
    resumed, fresh = EarlyStopping(3, "val_loss"), EarlyStopping(3, "val_loss")
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert run(resumed, [0.91]) == 1                                   # the third epoch without a new best
    assert run(fresh, [0.91]) is None
    with pytest.raises(ValueError, match="early stopping state is for 'val_loss', this run watches 'val_accuracy'"):
        EarlyStopping(3, "val_accuracy").load_state_dict(first.state_dict())


def test_an_unknown_metric_names_the_key_and_bad_patience_is_refused():
    with pytest.raises(ConfigError, match=r"^train\.early_stopping_metric: expected one of other, val_loss, "
                                          r"got 'val_f1'$"):
        EarlyStopping(2, "val_f1").on_epoch_end(LoopState(epoch=1), {"val_loss": 1.0, "other": 0.0})
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="patience: expected an integer >= 1"):
            EarlyStopping(bad)


def test_ends_the_real_loop_on_a_whole_epoch():
    generator = seed_everything(0)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # a separable problem: validation accuracy reaches its ceiling within a few epochs and stays there
    stopper = EarlyStopping(2, "val_accuracy")
    state = fit(model, optimizer, (x, y), (x, y), epochs=30, batch_size=16, generator=generator, hooks=[stopper])
    accuracy = [row["val_accuracy"] for row in state.history]
    assert state.stop and state.batch_in_epoch == 0 and state.epoch == len(accuracy) < 30
    assert max(accuracy[-2:]) <= max(accuracy[:-2])   # two epochs without a new best
    assert state.stop_reason.startswith("early stopping: val_accuracy has not improved on")


# --- stateful callbacks across a resume ---------------------------------------------------------------

def data(n=200, features=8, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)) % 3
    return torch.from_numpy(x), torch.from_numpy(y)


class Interrupted(Exception):
    pass


class CrashAt(Callback):
    def __init__(self, manager, step):
        self.manager, self.step = manager, step

    def on_step_end(self, state, step):
        if state.global_step == self.step:
            self.manager.wait()   # the checkpoint in flight is committed, as after a kill between saves
            raise Interrupted


def stateful_callbacks(kind):
    from ml.config import AnomalyConfig
    from ml.observe.anomaly import AnomalyMonitor

    if kind == "early_stopping":
        return [EarlyStopping(2, "val_loss")]
    # judged one step at a time and with no floor, so this healthy run's noise stops it mid-training
    return [AnomalyMonitor(AnomalyConfig(action="stop", loss_spike_window=10, loss_spike_zscore=3.0, loss_spike_persist=1,
                                         loss_spike_min_increase=0.0, max_grad_norm=None))]


def train_run(kind, root, crash_step=None, restore=True, seed=3, lr=0.01):
    """One training of the kind the resume promise is about: a stateful callback that can stop it,
    checkpoints every 3 steps and at epoch ends, resumed from ``root`` when a checkpoint is there."""
    from ml.checkpoint.manager import CheckpointManager
    from ml.model.architectures import MLP, ModelSpec
    from ml.train.checkpoints import CheckpointHook, resume
    from ml.train.stage import callback_states, restore_callbacks

    generator = seed_everything(seed)
    model = MLP(ModelSpec(8, (16,), 3, 0.2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    callbacks = stateful_callbacks(kind)
    with CheckpointManager(root) as manager:
        resumed = resume(manager, model, optimizer, generator=generator, epochs=20)
        resumed_at = resumed.state.global_step if resumed.state is not None else None
        if resumed.state is not None and restore:
            restore_callbacks(callbacks, resumed.callbacks)
        hooks = [*callbacks, CheckpointHook(manager, model, optimizer, generator=generator, every_steps=3,
                                            callback_states=callback_states(callbacks))]
        if crash_step is not None:
            hooks.append(CrashAt(manager, crash_step))
        state = fit(model, optimizer, data(), data(seed=1), epochs=20, batch_size=32, generator=generator,
                    hooks=hooks, state=resumed.state)
    return state, model.state_dict(), resumed_at


@pytest.mark.parametrize("kind, lr", [("anomaly", 0.01), ("early_stopping", 0.05)])
def test_a_resumed_run_stops_where_the_straight_run_stops(tmp_path, kind, lr):
    straight, weights, _ = train_run(kind, tmp_path / "straight", lr=lr)
    assert straight.stop and straight.global_step > 12
    crash = straight.global_step - 1   # the newest checkpoint is then 1-3 steps before the stop
    with pytest.raises(Interrupted):
        train_run(kind, tmp_path / "resumed", crash_step=crash, lr=lr)
    resumed, resumed_weights, resumed_at = train_run(kind, tmp_path / "resumed", seed=99, lr=lr)
    assert resumed_at is not None and straight.global_step - 3 <= resumed_at < straight.global_step
    assert (resumed.epoch, resumed.global_step, resumed.batch_in_epoch, resumed.stop_reason) == \
           (straight.epoch, straight.global_step, straight.batch_in_epoch, straight.stop_reason)
    assert resumed.history == straight.history
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)

    # without the callback's state the same resume stops somewhere else (or not at all)
    with pytest.raises(Interrupted):
        train_run(kind, tmp_path / "forgetful", crash_step=crash, lr=lr)
    forgetful, _, _ = train_run(kind, tmp_path / "forgetful", seed=99, restore=False, lr=lr)
    assert (forgetful.global_step, forgetful.stop_reason) != (straight.global_step, straight.stop_reason)
