"""The training loop's side of checkpointing: hooks that save training checkpoints and milestones
from inside :func:`ml.train.loop.fit`, and the one resume path the train stage (and every test of
an exact resume) goes through.

:mod:`ml.checkpoint` knows nothing of the loop: the loop state reaches it as ``state_dict()`` and
comes back through ``load_state_dict()`` here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ml.checkpoint.manager import CheckpointManager
from ml.checkpoint.policy import should_save
from ml.checkpoint.state import restore_training_state, training_state
from ml.checkpoint.store import CheckpointCorrupt
from ml.train.loop import Callback, LoopState

__all__ = ["CheckpointContext", "CheckpointHook", "MilestoneHook", "Resumed", "open_checkpoints", "resume",
           "resume_stage"]

CallbackStates = Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class CheckpointContext:
    """What the train stage knows about this training, stored in every checkpoint it makes. ``cfg``
    is the checkpoint settings section (``CheckpointConfig``)."""

    cfg: Any
    fingerprint: str
    run_id: str | None = None
    dataset: Mapping[str, Any] = field(default_factory=dict)
    git_commit: str = "unknown"
    fresh: bool = False


@dataclass(frozen=True)
class Resumed:
    """The outcome of a resume. ``state`` is None when training starts fresh, and ``note`` says why;
    ``callbacks`` holds the ``{name: state_dict}`` the checkpoint's callbacks saved (empty when
    starting fresh), for each callback's ``load_state_dict``."""

    state: LoopState | None
    name: str | None
    note: str
    callbacks: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def open_checkpoints(cfg: Any, on_saved: Callable[[Any], None] | None = None) -> CheckpointManager:
    """The checkpoint manager for ``cfg``: its root, retention, compression, checksum, writer priority
    and S3 mirror."""
    kwargs: dict[str, Any] = {"keep_last": cfg.keep_last, "on_saved": on_saved, "checksum": cfg.checksum,
                              "writer_priority": cfg.writer_priority}
    if cfg.compress != "none":
        kwargs["compress"] = cfg.compress
    if cfg.s3_bucket:
        from ml.checkpoint.s3 import S3Mirror

        kwargs["mirror"] = S3Mirror(cfg.s3_bucket, cfg.s3_prefix, endpoint_url=cfg.s3_endpoint_url)
    return CheckpointManager(cfg.dir, **kwargs)


def resume(manager: CheckpointManager, model: nn.Module, optimizer: torch.optim.Optimizer, *,
           generator: torch.Generator, scheduler: Any = None, scaler: Any = None,
           fingerprint: str | None = None, epochs: int | None = None) -> Resumed:
    """Restores the newest valid training checkpoint into the given objects and returns the loop
    state to continue from. Training starts fresh (``state`` None, with the reason in ``note``) when
    there is no checkpoint, none verifies, the newest is of another ``fingerprint`` (when one is
    given; compared with ``extra["fingerprint"]``) or of a finished training (stopped, or at
    ``epochs``). Distributed: every rank calls it together (see
    :meth:`CheckpointManager.load_latest_valid`)."""
    try:
        loaded = manager.load_latest_valid("training")
    except CheckpointCorrupt as exc:
        return Resumed(None, None, f"starting fresh: {exc}")
    if loaded is None:
        return Resumed(None, None, "starting fresh: no training checkpoint")
    skipped = "".join(f"; skipped {name}: {why}" for name, why in loaded.skipped)
    extra = dict(loaded.state.get("extra") or {})
    if fingerprint is not None and extra.get("fingerprint") != fingerprint:
        return Resumed(None, None, f"starting fresh: newest checkpoint {loaded.name} is of another "
                                   f"configuration{skipped}", skipped=loaded.skipped)
    loop = loaded.state["loop"]
    if (epochs is not None and loop["epoch"] >= epochs) or loop["stop"]:
        return Resumed(None, None, f"starting fresh: newest checkpoint {loaded.name} is of a finished "
                                   f"training{skipped}", skipped=loaded.skipped)
    state = LoopState()
    state.load_state_dict(restore_training_state(loaded.state, model, optimizer, generator=generator,
                                                 scheduler=scheduler, scaler=scaler))
    note = (f"resuming from checkpoint training/{loaded.name} (epoch {state.epoch}, step {state.global_step}, "
            f"batch {state.batch_in_epoch} of the epoch){skipped}")
    return Resumed(state, loaded.name, note, dict(loaded.state.get("callbacks") or {}), extra, loaded.skipped)


def resume_stage(manager: CheckpointManager, ctx: CheckpointContext, epochs: int, model: nn.Module,
                 optimizer: torch.optim.Optimizer, generator: torch.Generator, *, scaler: Any = None,
                 scheduler: Any = None) -> Resumed:
    """:func:`resume` as the train stage asks for it: not at all under ``--fresh`` or
    ``checkpoint.resume: false``, otherwise only a checkpoint of the same configuration."""
    if ctx.fresh or not ctx.cfg.resume:
        return Resumed(None, None, "starting fresh (" + ("--fresh" if ctx.fresh else "checkpoint.resume is false")
                       + ")")
    return resume(manager, model, optimizer, generator=generator, scaler=scaler, scheduler=scheduler,
                  fingerprint=ctx.fingerprint, epochs=epochs)


class CheckpointHook(Callback):
    """A loop hook that saves training checkpoints from inside :func:`ml.train.loop.fit`: after a
    step when :func:`ml.checkpoint.policy.should_save` says so, and after every epoch when
    ``at_epoch_end``.

    Args:
        extra: called at each save; its dict is stored under ``"extra"`` (static facts about the
            training: fingerprint, model spec, dataset).
        callback_states: called at each save; its ``{name: state_dict}`` is stored under
            ``"callbacks"`` and handed back on resume as :attr:`Resumed.callbacks`. The states are
            taken when this hook runs, so put this hook after the callbacks whose state it saves.
        clock: seconds, monotonic; injectable for tests.
        overlap: copy the parameters and optimizer state while the next forward and backward run;
            the next ``optimizer.step()`` waits for the copy. Turn it off when something other than
            ``optimizer.step()`` modifies parameters in place between steps.
    """

    def __init__(self, manager: CheckpointManager, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 generator: torch.Generator, scheduler: Any = None, scaler: Any = None,
                 every_steps: int | None = None, every_seconds: float | None = None,
                 at_epoch_end: bool = True, extra: Callable[[], Mapping[str, Any]] | None = None,
                 callback_states: CallbackStates | None = None,
                 clock: Callable[[], float] = time.monotonic, overlap: bool = True) -> None:
        if every_steps is not None and every_steps < 1:
            raise ValueError("every_steps must be >= 1 or None")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError("every_seconds must be > 0 or None")
        self.manager, self.model, self.optimizer = manager, model, optimizer
        self.generator, self.scheduler, self.scaler = generator, scheduler, scaler
        self.every_steps, self.every_seconds, self.at_epoch_end = every_steps, every_seconds, at_epoch_end
        self.overlap = overlap
        self._extra, self._callback_states, self._clock = extra, callback_states, clock
        self._last_save_time = clock()

    def on_step_end(self, state: LoopState, step: Any) -> None:
        now = self._clock()
        due = should_save(state.global_step, self.every_steps, self._last_save_time, now, self.every_seconds)
        if self.every_seconds is not None:
            due = self.manager.rank0_decides(due)  # clocks differ between ranks
        if due:
            self._save(state, now)

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        if self.at_epoch_end:
            self._save(state, self._clock())

    def save_now(self, state: LoopState) -> None:
        """Saves a training checkpoint of ``state`` now, outside the schedule (after a rollback: so
        the newest checkpoint is on the training's new path, for a resume and any later rollback)."""
        self._save(state, self._clock())

    def _save(self, state: LoopState, now: float) -> None:
        snapshot = training_state(self.model, self.optimizer, loop=state.state_dict(), generator=self.generator,
                                  scheduler=self.scheduler, scaler=self.scaler,
                                  extra=self._extra() if self._extra else None,
                                  callbacks=self._callback_states() if self._callback_states else None)
        self.manager.save_training_checkpoint(snapshot, state.global_step, epoch=state.epoch,
                                              optimizer=self.optimizer if self.overlap else None)
        self._last_save_time = now


class MilestoneHook(Callback):
    """Saves a milestone (the full training state, scheduler and GradScaler included, as in a
    training checkpoint) after an epoch whose monitored metric improved on its best so far.
    ``monitor`` items are ``metric:mode`` (``val_loss:min``)."""

    def __init__(self, manager: CheckpointManager, model: nn.Module, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator, monitor: Sequence[str], extra: Mapping[str, Any], run_id: str | None,
                 callback_states: CallbackStates | None = None, *, scheduler: Any = None,
                 scaler: Any = None) -> None:
        self.manager, self.model, self.optimizer, self.generator = manager, model, optimizer, generator
        self.scheduler, self.scaler = scheduler, scaler
        self.extra, self.run_id, self._callback_states = extra, run_id, callback_states
        self.monitor = [tuple(item.split(":")) for item in monitor]

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        for metric, mode in self.monitor:
            if metric not in metrics:
                continue
            snapshot = training_state(self.model, self.optimizer, loop=state.state_dict(), generator=self.generator,
                                      scheduler=self.scheduler, scaler=self.scaler, extra=self.extra,
                                      callbacks=self._callback_states() if self._callback_states else None)
            self.manager.save_milestone_checkpoint(snapshot, metric, metrics[metric], mode,
                                                   epoch=state.epoch, step=state.global_step, run_id=self.run_id,
                                                   notes=f"{metric} improved to {metrics[metric]:.6g}")
