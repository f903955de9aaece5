"""Early stopping: the one patience rule, over a table of metric series, and in the real loop."""

import json
import math

import pytest
import torch

from ml.errors import ConfigError
from ml.train.callbacks import EarlyStopping
from ml.train.loop import LoopState, fit, seed_everything

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
