import json
import logging
import math
from pathlib import Path

import pytest

from ml.observe.anomaly import (EVENTS_ARTIFACT, EXPLODING_GRADIENT, LOSS_SPIKE, NONFINITE_LOSS, AnomalyEvent,
                                AnomalyMonitor, LossSpike, detect_exploding_gradients, detect_loss_spikes,
                                detect_nonfinite_losses)
from ml.config import AnomalyConfig, load_params
from ml.train.loop import LoopState, StepValues

NAN, INF = math.nan, math.inf
REPO = Path(__file__).resolve().parents[2]
# train/loss of every step of the default run (params.yaml as committed: 30 epochs, 600 steps, a
# healthy run that converges to ~0.002 with single hard batches at 0.01-0.06), as the train stage
# logged it, to 6 significant digits.
DEFAULT_RUN_LOSSES = json.loads((Path(__file__).parent / "data/default_run_losses.json").read_text())


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
    values = dict(action="warn", loss_spike_window=5, loss_spike_zscore=6.0, loss_spike_persist=1,
                  max_grad_norm=10.0)
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
    ([1.0] * 12, []),
    ([1.0] * 7 + [2.0] * 3, [8]),                             # a sustained doubling, dated where it began
    ([1.0] * 7 + [2.0, 1.0, 1.0, 1.0], []),                   # one hard batch is not sustained
    ([1.0] * 7 + [2.0, 1.0, 1.0, 2.0, 1.0], []),              # ... nor are two, farther apart than persist
    ([1.0] * 7 + [2.0, 2.0, 1.0], [8]),                       # two of three is
    ([1.0] * 7 + [1.04] * 3, []),                             # a 4% rise is under the floor of 0.05 (min_increase)
    ([1.0, 1.0, 1.0, 100.0, 100.0, 100.0], []),               # the baseline is not yet full
    ([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.0] + [5.0] * 3, [8]),
    ([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.0] + [1.2] * 3, []),  # within the noise
    ([1.0] * 7 + [0.1] * 3, []),                              # a drop is not a spike
    ([1.0, 1.0, NAN, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 3.0], [9]),  # NaN neither fills the windows nor is scored
    ([1.0] * 7 + [3.0] * 12, [8]),                            # a level shift is flagged once, then absorbed
    ([1.0] * 7 + [3.0] * 3 + [1.0] * 3 + [3.0] * 3, [8, 14]),  # two excursions: two events
    ([2.0 * 0.97 ** i for i in range(40)], []),               # ordinary decreasing training loss
    ([0.0] * 7 + [1.0] * 3, [8]),                             # a zero level: log of a floor, not of 0
], ids=["constant", "sustained-doubling", "one-hard-batch", "two-apart", "two-of-three", "under-floor",
        "baseline-not-full", "noisy-spike", "noisy-no-spike", "drop", "nan-skipped", "level-shift", "two-excursions",
        "decreasing", "zero-level"])
def test_loss_spikes(losses, expected):
    events = detect_loss_spikes(losses, window=5, zscore=6.0, persist=3, min_increase=0.05)
    assert steps_of(events) == expected
    for event in events:
        assert event.kind == LOSS_SPIKE and event.value > event.threshold == 6.0


def default_spike_detector():
    """The loss-spike settings of the committed params.yaml."""
    cfg = load_params(REPO / "params.yaml").anomaly
    return dict(window=cfg.loss_spike_window, zscore=cfg.loss_spike_zscore, persist=cfg.loss_spike_persist,
                min_increase=cfg.loss_spike_min_increase)


def test_the_default_run_is_no_anomaly_with_the_default_settings():
    assert len(DEFAULT_RUN_LOSSES) == 600
    assert detect_nonfinite_losses(DEFAULT_RUN_LOSSES) == []
    assert detect_loss_spikes(DEFAULT_RUN_LOSSES, **default_spike_detector()) == []
    # Persistence is what keeps it quiet: judged one loss at a time, single hard batches are spikes.
    assert len(detect_loss_spikes(DEFAULT_RUN_LOSSES, **{**default_spike_detector(), "persist": 1})) >= 10


@pytest.mark.parametrize("start", [100, 200, 300, 400, 450, 550, 580])
def test_a_sustained_tenfold_jump_in_the_default_run_is_caught_where_it_starts(start):
    losses = DEFAULT_RUN_LOSSES[:start - 1] + [10 * v for v in DEFAULT_RUN_LOSSES[start - 1:]]
    (event,) = detect_loss_spikes(losses, **default_spike_detector())
    assert event.step == start and event.kind == LOSS_SPIKE


@pytest.mark.parametrize("start", [100, 333, 599])
def test_a_nan_in_the_default_run_is_caught_at_its_step(start):
    losses = DEFAULT_RUN_LOSSES[:start - 1] + [NAN] + DEFAULT_RUN_LOSSES[start:]
    assert steps_of(detect_nonfinite_losses(losses)) == [start]
    assert detect_loss_spikes(losses, **default_spike_detector()) == []


def test_loss_spike_state_round_trip_continues_both_windows():
    losses = DEFAULT_RUN_LOSSES[:400] + [10 * v for v in DEFAULT_RUN_LOSSES[400:]]
    straight = detect_loss_spikes(losses, **default_spike_detector())
    cfg = default_spike_detector()
    first = LossSpike(cfg["window"], cfg["zscore"], cfg["persist"], cfg["min_increase"])
    events = [e for step, v in enumerate(losses[:401], start=1) if (e := first.check(v, step))]
    second = LossSpike(cfg["window"], cfg["zscore"], cfg["persist"], cfg["min_increase"])
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    events += [e for step, v in enumerate(losses[401:], start=402) if (e := second.check(v, step))]
    assert events == straight and steps_of(events) == [401]


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


@pytest.mark.parametrize("make, message", [
    (lambda: LossSpike(0, 6.0), "window: expected an integer >= 1, got 0"),
    (lambda: LossSpike(5, 0.0), "zscore: expected a number > 0, got 0.0"),
    (lambda: detect_exploding_gradients([1.0], -1.0), "max_norm: expected a number > 0 or None, got -1.0"),
    (lambda: LossSpike(5, 6.0, 0), "persist: expected an integer >= 1, got 0"),
    (lambda: LossSpike(5, 6.0, 3, -0.1), "min_increase: expected a number >= 0, got -0.1"),
])
def test_bad_arguments(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value) == message


# --- the monitor ------------------------------------------------------------------------------------


def drive(monitor, epochs, state=None):
    """Feeds ``epochs``: a list of (step losses, step grad norms, epoch metrics), as ml.train.loop.fit
    would with a logging interval of one step."""
    state = state or LoopState()
    for losses, norms, metrics in epochs:
        for loss, norm in zip(losses, norms):
            state.global_step += 1
            monitor.on_log(state, [StepValues(state.global_step, state.epoch + 1, loss, norm)])
            if state.stop:
                return state
        state.epoch += 1
        monitor.on_epoch_end(state, metrics)
        if state.stop:
            return state
    return state


def test_monitor_records_tags_and_writes_events():
    tracker = RecordingTracker()
    monitor = AnomalyMonitor(config(), tracker)
    state = drive(monitor, [
        ([1.0] * 5 + [9.0], [1.0] * 6, {"val_loss": 0.5}),          # spike at step 6
        ([1.0, NAN, 1.0], [1.0, NAN, 50.0], {"val_loss": 0.6}),     # NaN loss at 8; norms NaN at 8 and 50 at 9
        ([1.0], [1.0], {"val_loss": 0.7}),                          # a metric that stops improving is no anomaly
    ])
    monitor.close()

    assert not state.stop
    assert [(e.kind, e.step, e.epoch) for e in monitor.events] == [
        (LOSS_SPIKE, 6, 1), (NONFINITE_LOSS, 8, 2), (EXPLODING_GRADIENT, 8, 2), (EXPLODING_GRADIENT, 9, 2)]
    assert tracker.tags == {"anomaly.loss_spike": 6, "anomaly.nonfinite_loss": 8, "anomaly.exploding_gradient": 8,
                            "anomalies": 4}
    # The count is refreshed with each new kind, at epoch end when it changed, and at close.
    assert tracker.tag_calls == [{"anomaly.loss_spike": 6, "anomalies": 1},
                                 {"anomaly.nonfinite_loss": 8, "anomalies": 2},
                                 {"anomaly.exploding_gradient": 8, "anomalies": 3},
                                 {"anomalies": 4},
                                 {"anomalies": 4}]
    lines = [json.loads(line) for line in tracker.texts[EVENTS_ARTIFACT].splitlines()]
    assert [line["kind"] for line in lines] == [e.kind for e in monitor.events]
    assert lines[1] == {"kind": NONFINITE_LOSS, "step": 8, "epoch": 2, "value": "nan", "threshold": "nan",
                        "message": "loss is nan at step 8"}
    assert lines[3]["value"] == 50.0 and lines[3]["threshold"] == 10.0


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
    monitor = AnomalyMonitor(config(action="warn"))
    state = drive(monitor, [([NAN, NAN], [INF, INF], {"val_loss": 1.0}), ([NAN], [INF], {"val_loss": 2.0})])
    assert not state.stop and state.epoch == 2 and len(monitor.events) == 6


def test_state_dict_round_trip_continues_the_window():
    first = AnomalyMonitor(config())
    drive(first, [([1.0] * 5, [1.0] * 5, {"val_loss": 1.0}), ([NAN], [1.0], {"val_loss": 1.1})])
    resumed, fresh = AnomalyMonitor(config()), AnomalyMonitor(config())
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [e.kind for e in resumed.events] == [NONFINITE_LOSS]
    for monitor in (resumed, fresh):
        drive(monitor, [([3.0], [1.0], {"val_loss": 1.2})], state=LoopState(epoch=2, global_step=6))
    assert [e.kind for e in resumed.events] == [NONFINITE_LOSS, LOSS_SPIKE]   # the window came back full
    assert fresh.events == []                                                 # a fresh window is quiet


def test_stop_in_the_real_loop_at_the_step_that_went_wrong():
    import torch

    from ml.train.loop import fit, seed_everything

    generator = seed_everything(0)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = AnomalyMonitor(config(action="stop", max_grad_norm=1e-6))
    state = fit(model, optimizer, (x, y), (x, y), epochs=5, batch_size=16, generator=generator, hooks=[monitor],
                log_every_steps=3)
    # the first step's norm is over the limit; the loop learns it at the logging interval, three steps in
    assert state.stop and state.global_step == 3 and state.epoch == 0
    assert [e.step for e in monitor.events] == [1, 2, 3] and monitor.stopped_by.step == 1
    assert state.stop_reason.startswith("anomaly exploding_gradient: gradient norm") and "at step 1 " in state.stop_reason


def test_event_to_dict_is_json_safe():
    event = AnomalyEvent(EXPLODING_GRADIENT, 3, 1, INF, -INF, "m")
    assert json.loads(json.dumps(event.to_dict())) == {"kind": EXPLODING_GRADIENT, "step": 3, "epoch": 1,
                                                       "value": "inf", "threshold": "-inf", "message": "m"}
