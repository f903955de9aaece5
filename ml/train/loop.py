"""The training loop. It reads top to bottom; it records through a Tracker and saves through hooks,
and never calls MLflow or torch.save itself."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ml.tracking.base import NullTracker, Tracker
from ml.train.batches import BatchSource, MemoryBatches
from ml.train.divergence import TrainingDiverged
from ml.train.step import StepOutput, train_step

if TYPE_CHECKING:
    from ml.train.distributed import RankSync
    from ml.train.memory import MemoryGuard

logger = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Where the loop is. ``batch_in_epoch`` is the sampler position: batches of the current epoch
    already consumed. ``epoch_generator_state`` is the shuffling RNG as it was when the epoch began,
    so the same permutation can be drawn again on resume. ``epoch_sums`` holds the running sums of the
    epoch in progress on the training device (summed loss, correct predictions, samples), from
    which the epoch's ``train_loss`` and ``train_accuracy`` come. ``unlogged`` holds the steps not yet
    logged (step, epoch, loss and grad norm as a device tensor of two), so a checkpoint taken
    between logging intervals still logs them, and hands them to the hooks, after a resume.
    ``skipped_steps`` counts the steps skipped for a non-finite loss or gradient (``consecutive_skips``
    of them in a row up to now), ``overflow_steps`` the fp16 steps GradScaler skipped."""

    epoch: int = 0
    global_step: int = 0
    batch_in_epoch: int = 0
    epoch_generator_state: torch.Tensor | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    stop: bool = False
    stop_reason: str | None = None
    epoch_sums: torch.Tensor | None = None
    unlogged: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)
    skipped_steps: int = 0
    consecutive_skips: int = 0
    overflow_steps: int = 0
    timing: StepTiming = field(default_factory=lambda: StepTiming())

    def state_dict(self) -> dict[str, Any]:
        """The position a checkpoint stores (tensors and JSON scalars; ``timing`` is this
        process's own and is not saved)."""
        return {"epoch": self.epoch, "global_step": self.global_step, "batch_in_epoch": self.batch_in_epoch,
                "epoch_generator_state": self.epoch_generator_state,
                "history": [dict(h) for h in self.history], "stop": self.stop, "stop_reason": self.stop_reason,
                "epoch_sums": self.epoch_sums,
                "skips": {"skipped": self.skipped_steps, "consecutive": self.consecutive_skips,
                          "overflow": self.overflow_steps},
                "unlogged": {"steps": [s for s, _, _ in self.unlogged], "epochs": [e for _, e, _ in self.unlogged],
                             "values": torch.stack([v for _, _, v in self.unlogged]) if self.unlogged else None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.epoch_generator_state = state["epoch_generator_state"]
        self.history = [dict(h) for h in state["history"]]
        self.stop = state["stop"]
        self.stop_reason = state.get("stop_reason")
        self.epoch_sums = state.get("epoch_sums")
        skips = state.get("skips") or {}
        self.skipped_steps, self.consecutive_skips = skips.get("skipped", 0), skips.get("consecutive", 0)
        self.overflow_steps = skips.get("overflow", 0)
        unlogged = state.get("unlogged")
        self.unlogged = (list(zip(unlogged["steps"], unlogged["epochs"], unlogged["values"]))
                         if unlogged and unlogged["steps"] else [])


@dataclass
class StepTiming:
    """Where step time goes, summed over the steps this process ran: fetching the batch (data wait)
    against forward/backward/step (compute, measured with CUDA events on a GPU)."""

    steps: int = 0
    samples: int = 0
    data_s: float = 0.0
    compute_s: float = 0.0
    wall_s: float = 0.0

    def summary(self) -> dict[str, float]:
        if not self.steps:
            return {}
        return {"mean_step_ms": 1000 * self.wall_s / self.steps,
                "samples_per_s": self.samples / self.wall_s if self.wall_s else 0.0,
                "data_wait_fraction": self.data_s / max(self.data_s + self.compute_s, 1e-12)}


@dataclass(frozen=True)
class StepValues:
    """One step's outputs as numbers, as the loop logged them. ``epoch`` is the 1-based epoch the
    step belongs to (as ``LoopState.history`` numbers it once done)."""

    step: int
    epoch: int
    loss: float
    grad_norm: float


class Callback:
    """A hook into :func:`fit`. Every method does nothing here; a callback overrides the ones it
    needs, and each one receives the :class:`LoopState` as the loop left it (``global_step`` counts
    the step just done). A callback that sets ``state.stop`` (and ``state.stop_reason``) ends the
    loop after the current step.

    A callback with state (a window, a patience count) also defines ``state_dict()`` and
    ``load_state_dict()`` (torch's ``Stateful`` protocol) and a ``state_key``; the train stage
    stores that state in training checkpoints and hands it back on resume.
    """

    state_key: str | None = None  # set by a callback with state: its key in a checkpoint's "callbacks"

    def on_train_start(self, state: LoopState) -> None:
        """Before the first step this call of :func:`fit` runs (after a resume: the restored state)."""

    def on_step_end(self, state: LoopState, step: StepOutput) -> None:
        """After every optimizer step, with its outputs as device tensors. Reading one as a number
        waits for the device: callbacks that need numbers use :meth:`on_log`."""

    def on_log(self, state: LoopState, values: Sequence[StepValues]) -> None:
        """At the logging interval (and at each epoch's end): the steps since the last call, as
        numbers. Runs before :meth:`on_step_end` of the step that completed the interval."""

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        """After an epoch's metrics are in ``state.history``."""

    def on_train_end(self, state: LoopState) -> None:
        """When :func:`fit` returns: all epochs done, or stopped."""


def seed_everything(seed: int) -> torch.Generator:
    """Seeds python, numpy and torch; returns the generator that shuffles the training data."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def batches_per_epoch(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


@torch.no_grad()
def evaluate_split(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024, *,
                   autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
                   sync: RankSync | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy over a whole split (one device-to-host transfer at the end),
    the forward passes under ``autocast`` (the training precision). Distributed (``sync``): ``x``
    and ``y`` are this rank's share of the split, and the means are over every rank's share."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)   # summed loss, correct predictions, samples
    sums[2] = len(x)
    for i in range(0, len(x), batch_size):
        with autocast():
            logits = model(x[i:i + batch_size]).float()
        sums[0] += nn.functional.cross_entropy(logits, y[i:i + batch_size], reduction="sum").double()
        sums[1] += (logits.argmax(dim=1) == y[i:i + batch_size]).sum()
    loss_sum, correct, samples = (sync.sum(sums) if sync is not None else sums).tolist()
    return {"loss": loss_sum / samples, "accuracy": correct / samples}


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: BatchSource | tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    tracker: Tracker | None = None,
    hooks: Sequence[Callback] = (),
    state: LoopState | None = None,
    log_every_steps: int = 1,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    eval_model: nn.Module | None = None,
    accumulate_steps: int = 1,
    clip_grad_norm: float | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_skipped_steps: int | None = None,
    memory_guard: MemoryGuard | None = None,
    sync: RankSync | None = None,
) -> LoopState:
    """Trains for ``epochs``; continues from ``state`` (possibly mid-epoch) when one is given.

    ``train`` is a batch source (:mod:`ml.train.batches`), or whole-split tensors on the training
    device, which it draws from as :class:`ml.train.batches.MemoryBatches` with ``batch_size`` and
    ``generator``. The source's position and shuffle state are kept in ``state`` after every step.

    Every step logs ``train/step_ms``, ``train/samples_per_s`` and ``train/data_wait_ms``; every
    ``log_every_steps`` steps (and at each epoch's end) the ``train/loss`` and ``train/grad_norm`` of
    each step since the last time, fetched from the device in one transfer. Every epoch logs
    ``train_loss``/``train_accuracy`` (running means over the epoch's steps) and ``val_loss``/
    ``val_accuracy``. A hook that sets ``state.stop`` ends the loop cleanly after the current step,
    keeping the position inside the epoch (see :func:`record_stop` for a history entry at that point).
    ``autocast`` and ``scaler`` shape each step (see :func:`ml.train.step.train_step`); validation
    runs under the same ``autocast``, on ``eval_model`` when given (the plain module of a compiled
    ``model``, so evaluation's shapes never recompile the training forward).

    One optimizer step takes ``accumulate_steps`` batches (the last step of an epoch may take fewer),
    so ``global_step``, the hooks' ``on_step_end`` and therefore checkpoints are at optimizer-step
    boundaries; ``clip_grad_norm`` clips each step's gradients; ``scheduler.step()`` follows every
    step, and ``train/lr`` logs the rate the step used. A skipped step (non-finite loss or
    gradients, see :func:`ml.train.step.train_step`) trains nothing and is left out of the epoch's
    running means; it logs ``train/skipped_steps`` (fp16 overflows: ``train/overflow_steps``), and
    ``max_skipped_steps`` of them in a row raise :class:`ml.train.divergence.TrainingDiverged`.
    ``memory_guard`` (:class:`ml.train.memory.MemoryGuard`) runs each step, on smaller micro-batches
    when memory runs short; pass it in ``hooks`` too for its state and events.

    Distributed (``sync``, :class:`ml.train.distributed.RankSync`; ``train`` this rank's shard,
    ``val`` too): the epoch's train sums and the validation sums are summed over the ranks, the
    logged loss is the ranks' mean, and a stop one rank's hook asks for stops every rank after
    the same step.
    """
    if log_every_steps < 1:
        raise ValueError(f"log_every_steps: expected an integer >= 1, got {log_every_steps!r}")
    if accumulate_steps < 1:
        raise ValueError(f"accumulate_steps: expected an integer >= 1, got {accumulate_steps!r}")
    tracker = tracker or NullTracker()
    log = tracker.log_metric
    state = state or LoopState()
    source = _as_source(train, batch_size, generator)
    source.load_state_dict({"position": state.batch_in_epoch, "epoch_generator_state": state.epoch_generator_state})
    per_epoch = len(source)
    device = source.device
    clock = _StepClock(device)
    state.unlogged = [(s, e, v.to(device)) for s, e, v in state.unlogged]

    def one_step(micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepOutput:
        return train_step(model, optimizer, micro_batches, autocast=autocast, scaler=scaler,
                          clip_grad_norm=clip_grad_norm)

    for hook in hooks:
        hook.on_train_start(state)
    while state.epoch < epochs and not state.stop:
        if state.batch_in_epoch == 0:
            state.epoch_sums = None
        if state.epoch_sums is None:
            state.epoch_sums = torch.zeros(3, dtype=torch.float64)
        sums = state.epoch_sums = state.epoch_sums.to(device=device, dtype=torch.float64)
        batches = iter(source)   # a new epoch draws its shuffle; a resumed one draws the same again
        state.epoch_generator_state = source.state_dict()["epoch_generator_state"]
        model.train()
        for b in range(state.batch_in_epoch, per_epoch, accumulate_steps):
            end = min(b + accumulate_steps, per_epoch)
            clock.begin()
            micro_batches = [next(batches) for _ in range(b, end)]
            clock.data_ready()
            lr = optimizer.param_groups[0]["lr"]
            out = (one_step(micro_batches) if memory_guard is None
                   else memory_guard.run_step(one_step, micro_batches, state.global_step + 1))
            if scheduler is not None:
                scheduler.step()
            data_s, compute_s, wall_s = clock.end()
            state.global_step += 1
            state.batch_in_epoch = end
            if not out.skipped:
                sums[0] += out.loss.double() * out.samples
                sums[1] += out.correct
                sums[2] += out.samples
            _count_skips(state, out, tracker, max_skipped_steps)
            timing = state.timing
            timing.steps += 1
            timing.samples += out.samples
            timing.data_s += data_s
            timing.compute_s += compute_s
            timing.wall_s += wall_s
            step = state.global_step
            log("train/step_ms", 1000 * wall_s, step)
            log("train/samples_per_s", out.samples / wall_s if wall_s else 0.0, step)
            log("train/data_wait_ms", 1000 * data_s, step)
            log("train/lr", lr, step)
            state.unlogged.append((step, state.epoch + 1, torch.stack((out.loss.float(), out.grad_norm.float()))))
            if len(state.unlogged) >= log_every_steps or state.batch_in_epoch == per_epoch:
                _log_steps(tracker, hooks, state, sync)
            for hook in hooks:
                hook.on_step_end(state, out)
            if sync is not None:
                state.stop = sync.any(state.stop)
            if state.stop:
                break
        if state.unlogged:  # stopped between logging intervals
            _log_steps(tracker, hooks, state, sync)
        if state.stop and state.batch_in_epoch < per_epoch:
            break
        val_metrics = evaluate_split(eval_model or model, *val, autocast=autocast, sync=sync)
        metrics = {**_train_means(sync.sum(sums) if sync is not None else sums), **_prefixed(val_metrics, "val_")}
        state.epoch += 1
        state.batch_in_epoch = 0
        state.history.append({"epoch": state.epoch, "step": state.global_step, **metrics})
        tracker.log_metrics(metrics, step=state.epoch)
        for hook in hooks:
            hook.on_epoch_end(state, metrics)
    for hook in hooks:
        hook.on_train_end(state)
    return state


def _as_source(train: BatchSource | tuple[torch.Tensor, torch.Tensor], batch_size: int | None,
               generator: torch.Generator | None) -> BatchSource:
    if not isinstance(train, tuple):
        return train
    if batch_size is None or generator is None:
        raise ValueError("fit: whole-split tensors need batch_size and generator (or pass a batch source)")
    return MemoryBatches(*train, batch_size, generator)


def _count_skips(state: LoopState, out: StepOutput, tracker: Tracker, max_skipped_steps: int | None) -> None:
    """Counts and logs a skipped or overflowed step; raises once ``max_skipped_steps`` in a row
    were skipped."""
    if out.overflow:
        state.overflow_steps += 1
        tracker.log_metric("train/overflow_steps", float(state.overflow_steps), state.global_step)
    if not out.skipped:
        state.consecutive_skips = 0
        return
    state.skipped_steps += 1
    state.consecutive_skips += 1
    tracker.log_metric("train/skipped_steps", float(state.skipped_steps), state.global_step)
    logger.warning("step %d skipped: its loss or gradients are not finite (%d in a row, %d in all)",
                   state.global_step, state.consecutive_skips, state.skipped_steps)
    if max_skipped_steps is not None and state.consecutive_skips >= max_skipped_steps:
        raise TrainingDiverged(state.global_step, state.consecutive_skips)


def _log_steps(tracker: Tracker, hooks: Sequence[Callback], state: LoopState, sync: RankSync | None = None) -> None:
    """Logs the unlogged steps' loss and gradient norm (distributed: the ranks' means) and hands
    them to the hooks' ``on_log``."""
    values = torch.stack([v for _, _, v in state.unlogged])
    # The one device-to-host transfer per logging interval: a GPU waits here, not at every step.
    numbers = (sync.mean(values) if sync is not None else values).tolist()
    values = [StepValues(step, epoch, loss, norm) for (step, epoch, _), (loss, norm) in zip(state.unlogged, numbers)]
    state.unlogged = []
    for v in values:
        tracker.log_metric("train/loss", v.loss, v.step)
        tracker.log_metric("train/grad_norm", v.grad_norm, v.step)
    for hook in hooks:
        hook.on_log(state, values)


def _train_means(sums: torch.Tensor) -> dict[str, float]:
    """``train_loss`` and ``train_accuracy`` from an epoch's running sums (loss, correct, samples)."""
    loss_sum, correct, samples = sums.tolist()
    if not samples:
        return {"train_loss": math.nan, "train_accuracy": math.nan}
    return {"train_loss": loss_sum / samples, "train_accuracy": correct / samples}


def _prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {prefix + k: v for k, v in metrics.items()}


def record_stop(model: nn.Module, state: LoopState, train: BatchSource | tuple[torch.Tensor, torch.Tensor],
                val: tuple[torch.Tensor, torch.Tensor], batch_size: int, tracker: Tracker | None = None, *,
                autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
                sync: RankSync | None = None) -> None:
    """After a stop mid-epoch: the partial epoch's running train means and the model evaluated on
    ``val`` as it stands, appended to the history at a fractional epoch (3.4 = 40% into the 4th), so
    a stopped run still reports where it ended."""
    if not state.batch_in_epoch:
        return
    sums = state.epoch_sums if state.epoch_sums is not None else torch.zeros(3, dtype=torch.float64)
    metrics = {**_train_means(sync.sum(sums) if sync is not None else sums),
               **_prefixed(evaluate_split(model, *val, autocast=autocast, sync=sync), "val_")}
    per_epoch = batches_per_epoch(len(train[0]), batch_size) if isinstance(train, tuple) else len(train)
    epoch = state.epoch + state.batch_in_epoch / per_epoch
    state.history.append({"epoch": round(epoch, 4), "step": state.global_step, **metrics})
    (tracker or NullTracker()).log_metrics(metrics, step=state.epoch + 1)


class _StepClock:
    """Times one step: data wait and compute with perf_counter on the CPU, compute with CUDA
    events on a GPU (read one step late, so timing never forces a device sync)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: tuple[Any, Any] | None = None
        self._last_compute_s = 0.0

    def begin(self) -> None:
        self._t0 = time.perf_counter()

    def data_ready(self) -> None:
        self._t1 = time.perf_counter()
        if self.cuda:
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()

    def end(self) -> tuple[float, float, float]:
        t2 = time.perf_counter()
        data_s = self._t1 - self._t0
        if not self.cuda:
            return data_s, t2 - self._t1, t2 - self._t0
        end_event = torch.cuda.Event(enable_timing=True)
        end_event.record()
        if self._pending is not None and self._pending[1].query():
            self._last_compute_s = self._pending[0].elapsed_time(self._pending[1]) / 1000
        self._pending = (self._start_event, end_event)
        return data_s, self._last_compute_s, t2 - self._t0
