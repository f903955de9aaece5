"""Training scalars in TensorBoard while the run trains, in the one event stream the histograms use.

    writer = open_writer(logdir)                       # flushes every FLUSH_SECS seconds
    hooks = [TrainingScalars(writer, optimizer), SharedWriterHistograms(writer, model, logdir, 50)]
    # tensorboard --logdir <logdir> shows them while fit() runs

:class:`TrainingScalars` is a :class:`ml.train.loop.Callback` that writes

- ``train/loss`` and ``train/grad_norm`` of every step, from :meth:`~ml.train.loop.Callback.on_log`
  (the loop's numbers: the hook never reads a device tensor itself);
- ``train/lr`` (the rate each step used) and ``train/samples_per_s`` (its samples over its wall
  time, from the loop's :class:`~ml.train.loop.StepTiming`) after every step, from plain floats;
- ``memory/rss_mb`` (the process's resident memory) and, on CUDA, ``memory/cuda_allocated_mb`` and
  ``memory/cuda_peak_mb`` (the allocator's counters: host-side, no synchronization), at each log;
- the epoch metrics (``epoch/val_loss``, ``epoch/val_accuracy``, ...) at each epoch's end, by epoch.

One ``SummaryWriter`` serves these scalars and the weight/gradient histograms
(:class:`SharedWriterHistograms`), so the directory holds one event file per run: TensorBoard and
``EventAccumulator`` read one ordered stream instead of merging interleaved files. The writer's own
thread flushes it every ``flush_secs`` seconds, which is what makes the run visible while it trains.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.observe.histograms import HistogramHook
from ml.train.loop import Callback

if TYPE_CHECKING:
    import torch

    from ml.train.loop import LoopState, StepValues
    from ml.train.step import StepOutput

FLUSH_SECS = 5.0
MB = 2**20


def tensorboard_root(configured: str | None = None) -> Path:
    """Where the train stage writes each run's TensorBoard directory (``<root>/<run id>``) while it
    trains: ``configured`` (``tracking.tensorboard_dir``), else ``mlops-tensorboard`` in the system's
    temporary directory (``$TMPDIR``, else /tmp)."""
    if configured is not None:
        return Path(configured).expanduser()
    return Path(tempfile.gettempdir()) / "mlops-tensorboard"


def open_writer(logdir: str | Path, flush_secs: float = FLUSH_SECS) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` into ``logdir`` (created) flushed every ``flush_secs``."""
    from torch.utils.tensorboard import SummaryWriter

    Path(logdir).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(logdir), flush_secs=flush_secs)


class TrainingScalars(Callback):
    """Loss, learning rate, throughput, gradient norm, memory and epoch metrics as TensorBoard
    scalars (see the module docstring). ``optimizer`` gives ``train/lr`` (left out without one);
    ``cuda`` adds the CUDA allocator's memory counters."""

    def __init__(self, writer: Any, optimizer: torch.optim.Optimizer | None = None, *, cuda: bool = False) -> None:
        self.writer, self.optimizer, self.cuda = writer, optimizer, cuda
        self._lr: float | None = None
        self._samples, self._wall_s = 0, 0.0

    def _current_lr(self) -> float | None:
        if self.optimizer is None:
            return None
        return float(self.optimizer.param_groups[0]["lr"])

    def on_train_start(self, state: LoopState) -> None:
        self._lr = self._current_lr()  # the rate the first step will use (restored with the scheduler on resume)
        self._samples, self._wall_s = state.timing.samples, state.timing.wall_s

    def on_step_end(self, state: LoopState, step: StepOutput) -> None:
        timing, at = state.timing, state.global_step
        samples, wall_s = timing.samples - self._samples, timing.wall_s - self._wall_s
        self._samples, self._wall_s = timing.samples, timing.wall_s
        if wall_s > 0:
            self.writer.add_scalar("train/samples_per_s", samples / wall_s, at)
        if self._lr is not None:
            self.writer.add_scalar("train/lr", self._lr, at)
        self._lr = self._current_lr()  # after the scheduler's step: the next step's rate

    def on_log(self, state: LoopState, values: Sequence[StepValues]) -> None:
        for v in values:
            self.writer.add_scalar("train/loss", v.loss, v.step)
            self.writer.add_scalar("train/grad_norm", v.grad_norm, v.step)
        for name, value in self.memory().items():
            self.writer.add_scalar(f"memory/{name}", value, state.global_step)

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"epoch/{name}", value, state.epoch)

    def memory(self) -> dict[str, float]:
        """The process's resident memory and, on CUDA, the allocator's current and peak bytes, in MiB."""
        import psutil

        out = {"rss_mb": psutil.Process().memory_info().rss / MB}
        if self.cuda:
            import torch

            out["cuda_allocated_mb"] = torch.cuda.memory_allocated() / MB
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / MB
        return out


class SharedWriterHistograms(HistogramHook):
    """:class:`ml.observe.histograms.HistogramHook` writing through ``writer`` (the one the scalars
    use) instead of a writer of its own; its :meth:`close` closes that writer, then logs the whole
    directory, scalars included, so it closes after every other user of the writer."""

    def __init__(self, writer: Any, model: Any, logdir: str | Path, every_steps: int, **kwargs: Any) -> None:
        super().__init__(model, logdir, every_steps, **kwargs)
        self._writer = writer


def log_directory(tracker: Any, logdir: str | Path, artifact_path: str) -> None:
    """Logs every file under ``logdir`` as an artifact under ``artifact_path``, keeping subdirectories."""
    logdir = Path(logdir)
    for path in sorted(p for p in logdir.rglob("*") if p.is_file()):
        relative = path.parent.relative_to(logdir).as_posix()
        tracker.log_artifact(path, artifact_path if relative == "." else f"{artifact_path}/{relative}")
