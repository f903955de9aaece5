import io
import re

import pytest
from rich.console import Console

from ml.train.loop import LoopState, StepValues
from ml.observe.progress import ProgressHook
from tests.unit.test_rollback import processed  # noqa: F401 - a fixture


class FakeClock:
    """Advances a fixed, exactly representable amount per reading."""

    def __init__(self, tick=0.125):
        self.now, self.tick = 0.0, tick

    def __call__(self):
        self.now += self.tick
        return self.now


class TtyStringIO(io.StringIO):
    def isatty(self):
        return True


def run_epochs(hook, epochs=2, steps_per_epoch=8, metrics=None):
    state = LoopState()
    for epoch in range(epochs):
        for b in range(steps_per_epoch):
            state.global_step += 1
            state.batch_in_epoch = b + 1
            hook.on_log(state, [StepValues(state.global_step, epoch + 1, float(state.global_step), 1.0)])
            hook.on_step_end(state, None)
        state.epoch += 1
        state.batch_in_epoch = 0
        hook.on_epoch_end(state, metrics or {"val_loss": 0.25 / (epoch + 1), "val_accuracy": 0.5 + 0.1 * epoch})
    hook.close()
    return state


def plain(text):
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_off_writes_nothing():
    stream = TtyStringIO()
    run_epochs(ProgressHook(16, "off", stream))
    assert stream.getvalue() == ""


def test_auto_is_quiet_when_the_stream_is_not_a_terminal():
    stream = io.StringIO()
    hook = ProgressHook(16, "auto", stream)
    run_epochs(hook)
    assert stream.getvalue() == "" and not hook.active


def test_auto_is_quiet_on_a_console_that_is_not_a_terminal():
    buffer = io.StringIO()
    run_epochs(ProgressHook(16, "auto", console=Console(file=buffer, force_terminal=False)))
    assert buffer.getvalue() == ""


def test_auto_draws_on_a_terminal():
    stream = TtyStringIO()
    run_epochs(ProgressHook(16, "auto", stream, clock=FakeClock()))
    assert "loss 16" in plain(stream.getvalue())


def test_on_draws_loss_rate_epoch_and_metrics():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200)
    hook = ProgressHook(16, "on", console=console, batch_size=32, epochs=2, clock=FakeClock(0.5),
                        epoch_metrics=("val_loss", "val_accuracy"))
    run_epochs(hook)
    text = plain(buffer.getvalue())
    assert "loss 16" in text and "16/16" in text and "epoch 2/2" in text
    assert "64 samples/s" in text                       # 2 steps/s (one step per 0.5 s) x 32 samples
    assert "val_loss 0.125" in text and "val_accuracy 0.6" in text


def test_on_without_batch_size_shows_steps_per_second_and_writes_to_a_plain_stream():
    stream = io.StringIO()
    run_epochs(ProgressHook(16, "on", stream, clock=FakeClock(0.5)))
    text = plain(stream.getvalue())
    assert "2 steps/s" in text and "loss 16" in text
    assert "val_loss 0.125" in text and "val_accuracy" not in text   # the default shows val_loss only


def test_redraws_are_throttled():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200)
    # One step every 0.125 s and at most 2 redraws a second: steps 1, 5, 9, 13 are drawn, then the
    # epoch end and close() draw step 16.
    hook = ProgressHook(16, "on", console=console, max_refresh_per_s=2, clock=FakeClock(0.125))
    run_epochs(hook, epochs=1, steps_per_epoch=16, metrics={})
    losses = re.findall(r"\bloss (\d+)", plain(buffer.getvalue()))
    assert losses[:4] == ["1", "5", "9", "13"] and set(losses[4:]) == {"16"}


def test_close_is_idempotent_and_stops_drawing():
    buffer = io.StringIO()
    hook = ProgressHook(4, "on", console=Console(file=buffer, force_terminal=True, width=200), clock=FakeClock())
    run_epochs(hook, epochs=1, steps_per_epoch=4)
    size = len(buffer.getvalue())
    hook.close()
    hook.on_log(LoopState(global_step=5), [StepValues(5, 2, 1.0, 1.0)])
    hook.on_step_end(LoopState(global_step=5), None)
    assert len(buffer.getvalue()) == size and not hook.active


@pytest.mark.parametrize("kwargs, message", [
    ({"total_steps": 0}, "total_steps: expected an integer >= 1, got 0"),
    ({"total_steps": 10, "enabled": "yes"}, "enabled: expected one of auto, on, off, got 'yes'"),
    ({"total_steps": 10, "batch_size": 0}, "batch_size: expected an integer >= 1 or None, got 0"),
    ({"total_steps": 10, "max_refresh_per_s": 0}, "max_refresh_per_s: expected a number > 0, got 0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        ProgressHook(**kwargs)
    assert str(info.value) == message


def test_the_stage_bar_counts_optimizer_steps_under_accumulation(processed, tmp_path):  # noqa: F811
    """The train stage's bar (built by Observers) ends at its total: optimizer steps, each of
    accumulate_steps batches (the last of an epoch shorter)."""
    from ml.config import load_params
    from ml.data.prepare import Schema
    from ml.observe.observers import Observers
    from ml.settings import TrackingConfig
    from ml.train.stage import train
    from tests.conftest import small_params, write_params
    from tests.unit.test_rollback import PER_EPOCH, Recorder, train_config

    cfg = train_config(tmp_path, accumulate_steps=3, epochs=2)
    params = load_params(write_params(tmp_path, small_params(train={"accumulate_steps": 3, "epochs": 2,
                                                                    "batch_size": cfg.batch_size})))
    tracker = Recorder()
    observers = Observers(params, tracker, Schema.read(processed), TrackingConfig(progress="off",
                                                                                   histogram_every_steps=None))
    try:
        result = train(cfg, processed, tracker, hook_factory=observers.hooks)
    finally:
        observers.close()
    assert observers.progress.total_steps == result.state.global_step == 2 * -(-PER_EPOCH // 3)
