import json
import logging
import math

import pytest

from ml.observe.anomaly import (EVENTS_ARTIFACT, EXPLODING_GRADIENT, LOSS_SPIKE, NONFINITE_LOSS, PLATEAU, AnomalyEvent,
                        AnomalyMonitor, LossSpike, detect_exploding_gradients, detect_loss_spikes,
                        detect_nonfinite_losses, detect_plateaus, robust_zscore)
from ml.config import AnomalyConfig
from ml.errors import ConfigError
from ml.train.loop import LoopState

NAN, INF = math.nan, math.inf


class RecordingTracker:
    """A Tracker that remembers what it was given."""

    run_id = "run"

    def __init__(self):
        self.tags, self.tag_calls, self.texts, self.closed = {}, [], {}, False

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        pass

    def set_tags(self, tags):
        self.tag_calls.append(dict(tags))
        self.tags.update(tags)

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_text(self, text, artifact_file):
        self.texts[artifact_file] = text

    def close(self, status="FINISHED"):
        self.closed = True


def config(**overrides):
    values = dict(action="warn", loss_spike_window=5, loss_spike_zscore=6.0, max_grad_norm=10.0, patience=2,
                  patience_metric="val_loss", patience_mode="min")
    return AnomalyConfig(**{**values, **overrides})


def steps_of(events):
    return [e.step for e in events]


# --- detectors over series ------------------------------------------------------------------------


@pytest.mark.parametrize("losses, expected", [
    ([1.0, 0.9, 0.8], []),
    ([1.0, 0.9, NAN, 0.8], [3]),
    ([NAN], [1]),
    ([1.0, INF, -INF, 0.5], [2, 3]),
    ([], []),
], ids=["finite", "single-nan", "nan-first", "inf-both-signs", "empty"])
def test_nonfinite_losses(losses, expected):
    events = detect_nonfinite_losses(losses)
    assert steps_of(events) == expected
    assert all(e.kind == NONFINITE_LOSS for e in events)


@pytest.mark.parametrize("losses, expected", [
    ([1.0] * 10, []),
    ([1.0] * 5 + [2.0], [6]),
    ([1.0] * 5 + [1.05], []),                                 # MAD 0: a 5% wobble is under 6 x 1% of the level
    ([1.0] * 5 + [1.07], [6]),                                # ... a 7% jump is not
    ([1.0, 1.0, 1.0, 100.0], []),                             # the window is not yet full
    ([1.0, 1.1, 0.9, 1.05, 0.95, 5.0], [6]),
    ([1.0, 1.1, 0.9, 1.05, 0.95, 1.2], []),                   # within the noise
    ([1.0] * 5 + [0.1], []),                                  # a drop is not a spike
    ([1.0, 1.0, NAN, 1.0, 1.0, 1.0, 3.0], [7]),               # NaN neither fills the window nor is scored
    ([1.0] * 5 + [3.0] * 5, [6]),                             # a level shift is flagged once, then absorbed
    ([2.0 * 0.97 ** i for i in range(40)], []),               # ordinary decreasing training loss
    ([0.0] * 5 + [1e-13, 1.0], [7]),                          # a zero level: absolute floor, not division by 0
], ids=["constant", "jump-after-constant", "wobble-after-constant", "jump-7pct", "window-not-full", "noisy-spike",
        "noisy-no-spike", "drop", "nan-in-window", "level-shift", "decreasing", "zero-level"])
def test_loss_spikes(losses, expected):
    events = detect_loss_spikes(losses, window=5, zscore=6.0)
    assert steps_of(events) == expected
    for event in events:
        assert event.kind == LOSS_SPIKE and event.value > event.threshold == 6.0


@pytest.mark.parametrize("norms, max_norm, expected", [
    ([1.0, 2.0, 3.0], 10.0, []),
    ([1.0, 11.0, 5.0], 10.0, [2]),
    ([10.0], 10.0, []),                                       # at the limit is not above it
    ([1.0, NAN, INF], 10.0, [2, 3]),
    ([1e9, NAN], None, [2]),                                  # no limit: only non-finite norms
], ids=["below", "above", "at-limit", "non-finite", "no-limit"])
def test_exploding_gradients(norms, max_norm, expected):
    events = detect_exploding_gradients(norms, max_norm)
    assert steps_of(events) == expected
    assert all(e.kind == EXPLODING_GRADIENT for e in events)


@pytest.mark.parametrize("values, patience, mode, expected", [
    ([5.0, 4.0, 3.0, 2.0, 1.0], 3, "min", []),
    ([1.0, 1.0, 1.0, 1.0], 3, "min", [4]),
    ([1.0] * 9, 3, "min", [4]),                               # one event per plateau
    ([3.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0], 3, "min", [5, 9]),   # recovery, then a new plateau
    ([0.5, 0.6, 0.6, 0.55, 0.6], 3, "max", [5]),
    ([1.0, 2.0, 3.0], 2, "max", []),
    ([1.0, NAN, NAN, NAN], 3, "min", [4]),                    # NaN is no improvement
    ([2.0, 1.0], 1, "min", []),
    ([1.0, 1.0], 1, "min", [2]),
], ids=["improving", "constant", "long-plateau-once", "recovery", "max-mode", "max-improving", "nan",
        "patience-1-improving", "patience-1-flat"])
def test_plateaus(values, patience, mode, expected):
    events = detect_plateaus(values, patience, mode)
    assert steps_of(events) == expected
    assert all(e.kind == PLATEAU for e in events)


@pytest.mark.parametrize("value, window, expected", [
    (3.0, [1.0, 2.0, 3.0, 4.0, 5.0], 0.0),
    (5.0, [1.0, 2.0, 3.0, 4.0, 5.0], 2.0 / 1.4826),
    (2.0, [1.0, 1.0, 1.0, 1.0, 3.0], 1.0 / (1.2533 * 0.4)),  # MAD 0: mean absolute deviation
    (1.5, [1.0, 1.0, 1.0], 0.5 / 0.01),                       # all equal: 1% of the level
])
def test_robust_zscore(value, window, expected):
    assert robust_zscore(value, window) == pytest.approx(expected)


@pytest.mark.parametrize("make, message", [
    (lambda: LossSpike(0, 6.0), "window: expected an integer >= 1, got 0"),
    (lambda: LossSpike(5, 0.0), "zscore: expected a number > 0, got 0.0"),
    (lambda: detect_plateaus([1.0], 0, "min"), "patience: expected an integer >= 1, got 0"),
    (lambda: detect_plateaus([1.0], 1, "up"), "mode: expected one of min, max, got 'up'"),
    (lambda: detect_exploding_gradients([1.0], -1.0), "max_norm: expected a number > 0 or None, got -1.0"),
    (lambda: robust_zscore(1.0, []), "window: expected at least one value"),
])
def test_bad_arguments(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value) == message


# --- the monitor ------------------------------------------------------------------------------------


def drive(monitor, epochs):
    """Feeds ``epochs``: a list of (step losses, step grad norms, epoch metrics), as ml.train.loop.fit would."""
    state = LoopState()
    norms = iter([n for losses, grads, _ in epochs for n in grads])
    monitor.grad_norm = lambda: next(norms)
    for losses, _, metrics in epochs:
        for loss in losses:
            state.global_step += 1
            monitor.on_step_end(state, loss)
            if state.stop:
                return state
        state.epoch += 1
        monitor.on_epoch_end(state, metrics)
        if state.stop:
            return state
    return state


def test_monitor_records_tags_and_writes_events():
    tracker = RecordingTracker()
    monitor = AnomalyMonitor(config(patience=2), tracker)
    state = drive(monitor, [
        ([1.0] * 5 + [9.0], [1.0] * 6, {"val_loss": 0.5}),          # spike at step 6
        ([1.0, NAN, 1.0], [1.0, NAN, 50.0], {"val_loss": 0.6}),     # NaN loss at 8; norms NaN at 8 and 50 at 9
        ([1.0], [1.0], {"val_loss": 0.7}),                          # second epoch without improvement
    ])
    monitor.close()

    assert not state.stop
    assert [(e.kind, e.step, e.epoch) for e in monitor.events] == [
        (LOSS_SPIKE, 6, 1), (NONFINITE_LOSS, 8, 2), (EXPLODING_GRADIENT, 8, 2), (EXPLODING_GRADIENT, 9, 2),
        (PLATEAU, 10, 3)]
    assert tracker.tags == {"anomaly.loss_spike": 6, "anomaly.nonfinite_loss": 8, "anomaly.exploding_gradient": 8,
                            "anomaly.plateau": 10, "anomalies": 5}
    # The count is refreshed with each new kind, at epoch end when it changed, and at close.
    assert tracker.tag_calls == [{"anomaly.loss_spike": 6, "anomalies": 1},
                                 {"anomaly.nonfinite_loss": 8, "anomalies": 2},
                                 {"anomaly.exploding_gradient": 8, "anomalies": 3},
                                 {"anomalies": 4},
                                 {"anomaly.plateau": 10, "anomalies": 5},
                                 {"anomalies": 5}]
    lines = [json.loads(line) for line in tracker.texts[EVENTS_ARTIFACT].splitlines()]
    assert [line["kind"] for line in lines] == [e.kind for e in monitor.events]
    assert lines[1] == {"kind": NONFINITE_LOSS, "step": 8, "epoch": 2, "value": "nan", "threshold": "nan",
                        "message": "loss is nan at step 8"}
    assert lines[3]["value"] == 50.0 and lines[3]["threshold"] == 10.0
    assert lines[4]["value"] == 0.7 and lines[4]["threshold"] == 0.5


def test_monitor_without_anomalies_still_tags_zero_and_writes_an_empty_artifact():
    tracker = RecordingTracker()
    monitor = AnomalyMonitor(config(), tracker)
    drive(monitor, [([1.0, 0.9, 0.8], [1.0, 1.0, 1.0], {"val_loss": 0.5})])
    monitor.close()
    monitor.close()
    assert tracker.tags == {"anomalies": 0}
    assert tracker.texts == {EVENTS_ARTIFACT: ""}
    assert len(tracker.tag_calls) == 1


def test_console_warnings_once_per_kind_per_epoch(caplog):
    monitor = AnomalyMonitor(config(loss_spike_window=2), RecordingTracker())
    with caplog.at_level(logging.WARNING, logger="ml.observe.anomaly"):
        drive(monitor, [
            ([NAN, NAN, NAN, 1.0, 1.0, 5.0], [1.0] * 6, {"val_loss": 1.0}),
            ([NAN, NAN], [1.0, 1.0], {"val_loss": 0.5}),
        ])
        monitor.close()
    messages = [r.getMessage() for r in caplog.records]
    nan_warnings = [m for m in messages if m.startswith(f"anomaly {NONFINITE_LOSS}")]
    assert len(nan_warnings) == 2                                   # epoch 1 and epoch 2
    assert "(2 more nonfinite_loss events were not shown)" in nan_warnings[1]
    assert len([m for m in messages if m.startswith(f"anomaly {LOSS_SPIKE}")]) == 1
    assert messages[-1] == "1 further anomaly events were recorded but not shown"
    assert len(monitor.events) == 6                                 # every event is kept


def test_stop_action_stops_at_the_first_anomaly(caplog):
    tracker = RecordingTracker()
    monitor = AnomalyMonitor(config(action="stop"), tracker)
    with caplog.at_level(logging.WARNING, logger="ml.observe.anomaly"):
        state = drive(monitor, [([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 20.0, 1.0], {"val_loss": 1.0}),
                                ([1.0], [1.0], {"val_loss": 1.0})])
    assert state.stop and state.global_step == 3 and state.epoch == 0
    assert state.stop_reason == "anomaly exploding_gradient: gradient norm 20 at step 3 exceeds 10"
    assert [e.step for e in monitor.events] == [3]
    assert tracker.tags["anomaly.stopped"] == f"{EXPLODING_GRADIENT} at step 3"
    assert any(r.getMessage().startswith("stopping training (anomaly.action=stop)") for r in caplog.records)


def test_warn_action_never_stops():
    monitor = AnomalyMonitor(config(action="warn", patience=1))
    state = drive(monitor, [([NAN, NAN], [INF, INF], {"val_loss": 1.0}), ([NAN], [INF], {"val_loss": 2.0})])
    assert not state.stop and state.epoch == 2 and len(monitor.events) == 7


def test_stop_on_plateau_ends_the_real_loop_cleanly():
    import torch

    from ml.train.loop import fit, seed_everything

    generator = seed_everything(0)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # val_loss falls, so in "max" mode the second evaluation is already no improvement.
    monitor = AnomalyMonitor(config(action="stop", patience=1, patience_mode="max"))
    state = fit(model, optimizer, (x, y), (x, y), epochs=5, batch_size=16, generator=generator, hooks=[monitor])
    assert state.stop and state.epoch == 2
    assert [(e.kind, e.epoch) for e in monitor.events] == [(PLATEAU, 2)]


def test_grad_norm_source_returning_none_is_skipped():
    monitor = AnomalyMonitor(config())
    state = LoopState(global_step=1)
    monitor.grad_norm = lambda: None
    monitor.on_step_end(state, 1.0)
    assert monitor.events == []


def test_missing_patience_metric_names_the_key():
    monitor = AnomalyMonitor(config(patience_metric="val_f1"))
    with pytest.raises(ConfigError, match=r"^anomaly\.patience_metric: expected one of val_accuracy, val_loss, "
                                          r"got 'val_f1'$"):
        monitor.on_epoch_end(LoopState(epoch=1), {"val_loss": 1.0, "val_accuracy": 0.5})


def test_patience_off_ignores_metrics():
    monitor = AnomalyMonitor(config(patience=None, patience_metric="absent"))
    drive(monitor, [([1.0], [1.0], {"val_loss": 1.0})] * 5)
    assert monitor.events == []


def test_state_dict_round_trip_continues_the_window():
    first = AnomalyMonitor(config())
    drive(first, [([1.0] * 5, [1.0] * 5, {"val_loss": 1.0}), ([NAN], [1.0], {"val_loss": 1.1})])
    resumed = AnomalyMonitor(config())
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [e.kind for e in resumed.events] == [NONFINITE_LOSS]
    state = LoopState(epoch=2, global_step=7)
    resumed.on_step_end(state, 3.0)                                 # the window came back full
    resumed.on_epoch_end(LoopState(epoch=3, global_step=7), {"val_loss": 1.2})   # and the plateau count
    assert [e.kind for e in resumed.events] == [NONFINITE_LOSS, LOSS_SPIKE, PLATEAU]


def test_event_to_dict_is_json_safe():
    event = AnomalyEvent(EXPLODING_GRADIENT, 3, 1, INF, -INF, "m")
    assert json.loads(json.dumps(event.to_dict())) == {"kind": EXPLODING_GRADIENT, "step": 3, "epoch": 1,
                                                       "value": "inf", "threshold": "-inf", "message": "m"}
