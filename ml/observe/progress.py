"""A training progress bar (rich) as a :class:`ml.train.loop.Callback`.

``ProgressHook(total_steps, enabled=cfg.tracking.progress)`` shows the epoch, steps done of
``total_steps``, the latest loss, samples/s (steps/s without a ``batch_size``), the latest values of
``epoch_metrics``, elapsed and remaining time. It redraws at most ``max_refresh_per_s`` times a
second, from the training thread (no refresh thread), and costs one clock read per step between
redraws. The loss shown is the latest one the loop logged (:meth:`ml.train.loop.Callback.on_log`),
so the bar never makes the device wait. ``enabled``: ``"on"`` always draws, ``"off"`` never,
``"auto"`` only when the stream is a terminal. Under :func:`ml.tracking.console.capture_console`,
pass ``stream=capture.original("stderr")`` so the bar reaches the terminal and stays out of the
log. The bar does not redirect ``sys.stdout``: prints and log lines still go where they went before.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from ml.train.loop import Callback

if TYPE_CHECKING:
    from ml.train.loop import LoopState, StepValues
    from ml.train.step import StepOutput

MODES = ("auto", "on", "off")


class ProgressHook(Callback):
    """See the module docstring.

    Args:
        total_steps: Optimizer steps of the whole run, >= 1: under gradient accumulation each takes
            ``accumulate_steps`` batches (:func:`ml.train.schedule.optimizer_steps`), as the loop's
            ``global_step`` counts them.
        enabled: ``"auto"``, ``"on"`` or ``"off"``.
        stream: Where to draw (default ``sys.stderr`` at the first step); ignored when ``console`` is given.
        console: A ``rich.console.Console`` to draw on (its ``is_terminal`` decides ``"auto"``).
        batch_size: Samples per optimizer step (``batch_size * accumulate_steps``), for samples/s;
            without it the rate is steps/s.
        epochs: Total epochs, shown as ``epoch 3/30``.
        epoch_metrics: Names from the epoch metrics shown after each epoch (default ``val_loss``).
        max_refresh_per_s: Most redraws per second.
        clock: Monotonic seconds; injectable for tests.
    """

    def __init__(self, total_steps: int, enabled: str = "auto", stream: TextIO | None = None, *,
                 console: Any = None, batch_size: int | None = None, epochs: int | None = None,
                 epoch_metrics: Sequence[str] = ("val_loss",), max_refresh_per_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps: expected an integer >= 1, got {total_steps!r}")
        if enabled not in MODES:
            raise ValueError(f"enabled: expected one of {', '.join(MODES)}, got {enabled!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1 or None, got {batch_size!r}")
        if not max_refresh_per_s > 0:
            raise ValueError(f"max_refresh_per_s: expected a number > 0, got {max_refresh_per_s!r}")
        self.total_steps = total_steps
        self.enabled = enabled
        self.stream = stream
        self.console = console
        self.batch_size = batch_size
        self.epochs = epochs
        self.epoch_metrics = tuple(epoch_metrics)
        self.interval_s = 1.0 / max_refresh_per_s
        # The rate is measured over at least a second, so it does not jitter from one redraw to the next.
        self.rate_window_s = max(1.0, self.interval_s)
        self.clock = clock
        self.active = enabled != "off"  # False once "auto" found no terminal, or after close()
        self._progress: Any = None
        self._task: Any = None
        self._last_draw: float | None = None
        self._rate_since: tuple[float, int] | None = None  # (time, step) the shown rate is measured from
        self._fields = {"epoch": "", "loss": "-", "rate": "-", "metrics": ""}
        self._loss = float("nan")
        self._state: LoopState | None = None

    # --- Callback ----------------------------------------------------------------------------------

    def on_log(self, state: LoopState, values: Sequence[StepValues]) -> None:
        if values:
            self._loss = values[-1].loss

    def on_step_end(self, state: LoopState, step: StepOutput) -> None:
        if not self.active:
            return
        self._state = state
        now = self.clock()
        if self._last_draw is not None and now - self._last_draw < self.interval_s:
            return
        if self._progress is not None:
            self._draw(state, now)
        elif self._create(state):
            self._draw(state, now, refresh=False)
            self._progress.start()  # draws the first frame

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        shown = [f"{name} {metrics[name]:.4g}" for name in self.epoch_metrics if name in metrics]
        self._fields["metrics"] = "  ".join(shown)
        if self._progress is not None:
            self._draw(state, self.clock())

    def close(self) -> None:
        """Draws the final state and stops the bar (it stays on screen). Idempotent."""
        self.active = False
        if self._progress is not None:
            if self._state is not None:
                self._draw(self._state, self.clock())
            self._progress.stop()
            self._progress = None

    # --- drawing -----------------------------------------------------------------------------------

    def _create(self, state: LoopState) -> bool:
        """Builds the bar (not yet shown); False when "auto" finds no terminal."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        console = self.console
        if console is None:
            stream = self.stream if self.stream is not None else sys.stderr
            is_tty = bool(getattr(stream, "isatty", lambda: False)())
            if self.enabled == "auto" and not is_tty:
                self.active = False
                return False
            console = Console(file=stream, force_terminal=True if self.enabled == "on" else None)
        elif self.enabled == "auto" and not console.is_terminal:
            self.active = False
            return False
        self._progress = Progress(
            TextColumn("{task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, auto_refresh=False, transient=False, redirect_stdout=False, redirect_stderr=False)
        self._task = self._progress.add_task("train", total=self.total_steps, completed=state.global_step,
                                             **self._fields)
        return True

    def _draw(self, state: LoopState, now: float, refresh: bool = True) -> None:
        epoch = state.epoch + 1 if state.batch_in_epoch else max(state.epoch, 1)
        self._fields["epoch"] = f"epoch {epoch}/{self.epochs}" if self.epochs else f"epoch {epoch}"
        self._fields["loss"] = f"{self._loss:.4g}"
        if self._rate_since is None:
            self._rate_since = (now, state.global_step)
        elif now - self._rate_since[0] >= self.rate_window_s:
            per_s = (state.global_step - self._rate_since[1]) / (now - self._rate_since[0])
            self._fields["rate"] = (f"{per_s * self.batch_size:,.0f} samples/s" if self.batch_size
                                    else f"{per_s:.3g} steps/s")
            self._rate_since = (now, state.global_step)
        self._last_draw = now
        self._progress.update(self._task, completed=state.global_step, **self._fields)
        if refresh:
            self._progress.refresh()
