"""Going back to earlier weights: rolling back after a divergence, and the best epoch's weights at
the end of training.

Rollback (after large-scale practice, e.g. PaLM's restarts before a loss spike): when training
diverges, ``train.max_skipped_steps`` non-finite steps in a row (:class:`TrainingDiverged` from
the loop) or a loss spike the anomaly monitor confirmed under ``anomaly.action: rollback``
(:class:`LossSpikeRollback`), :meth:`Rollbacks.recover` restores the newest valid training
checkpoint of this configuration taken before the trouble began, through the same restore as a
resume (:func:`ml.checkpoint.state.restore_training_state`), and moves the data position past the
batches read since that checkpoint: they are skipped, not trained on again. Each rollback is
recorded on the run (metric ``train/rollbacks``, tags ``rollbacks`` and ``rollback.<n>``) and on
the console; after ``train.max_rollbacks`` of them, or when no checkpoint precedes the trouble,
training ends with a one-line :class:`RollbackFailed`. The train stage does this around
:func:`ml.train.loop.fit` (:func:`ml.train.stage.train`), so the loop itself only raises.

Restore-best (``train.restore_best``, Keras's ``restore_best_weights``): :class:`BestWeights`
keeps a CPU copy of the weights of the best epoch so far by one metric, in its ``state_dict()``
so that training checkpoints (and therefore resumes and rollbacks) carry it. The milestone tier is
not used for this: it holds the best over every training the checkpoint root has seen, and a
milestone is only written when an epoch beats all of them, not just this training's epochs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ml.checkpoint.manager import CheckpointManager
from ml.checkpoint.state import restore_training_state
from ml.checkpoint.store import CheckpointCorrupt
from ml.errors import PipelineError
from ml.metrics import is_improvement
from ml.tracking.base import NullTracker, Tracker
from ml.train.divergence import TrainingDiverged
from ml.train.loop import Callback, LoopState

__all__ = ["BestWeights", "LossSpikeRollback", "RollbackFailed", "RollbackRecord", "Rollbacks", "trouble_start"]

logger = logging.getLogger(__name__)


class LossSpikeRollback(PipelineError):
    """A loss spike confirmed by the anomaly monitor under ``anomaly.action: rollback``: training
    should go back to before ``start_step``, the step the rise began. Caught by the train stage;
    it reaches the user (one line) only where nothing rolls back."""

    exit_code = 6

    def __init__(self, start_step: int, message: str) -> None:
        self.start_step = start_step
        super().__init__(f"training diverged: {message} (anomaly.action: rollback)")


class RollbackFailed(PipelineError):
    """Training diverged and could not be rolled back: ``train.max_rollbacks`` spent, or no valid
    training checkpoint of this configuration before the trouble."""

    exit_code = 6


def trouble_start(signal: TrainingDiverged | LossSpikeRollback) -> int:
    """The first step of the trouble a divergence signal reports: the first of the skipped steps
    in a row, or the step a loss spike began."""
    if isinstance(signal, LossSpikeRollback):
        return signal.start_step
    return signal.step - signal.consecutive + 1


@dataclass(frozen=True)
class RollbackRecord:
    """One rollback: at ``step`` the trouble that began at ``start_step`` was noticed; training went
    back to ``checkpoint`` (taken at ``checkpoint_step``) and skipped ``batches_skipped`` batches."""

    number: int
    step: int
    start_step: int
    checkpoint: str
    checkpoint_step: int
    batches_skipped: int
    reason: str

    def describe(self) -> str:
        return (f"rollback {self.number} at step {self.step}: restored training/{self.checkpoint} (step "
                f"{self.checkpoint_step}), skipped {self.batches_skipped} batches; {self.reason}")


class Rollbacks(Callback):
    """Rolls a diverged training back; see the module docstring.

    A callback only for its state: the rollbacks so far are its ``state_dict()``, saved in training
    checkpoints, so ``max_rollbacks`` counts over a resumed training too. Loading never forgets
    rollbacks this process already made (the checkpoint a rollback restores predates it).

    Args:
        manager: the training's checkpoint manager, or None (nothing to roll back to).
        max_rollbacks: rollbacks allowed in this training (``train.max_rollbacks``).
        fingerprint: only checkpoints of this configuration (``extra["fingerprint"]``) are restored.
        scheduler, scaler: restored with the model and optimizer, as on resume.
    """

    state_key = "rollbacks"

    def __init__(self, manager: CheckpointManager | None, max_rollbacks: int, fingerprint: str | None, *,
                 model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                 scheduler: Any = None, scaler: Any = None, tracker: Tracker | None = None) -> None:
        if not isinstance(max_rollbacks, int) or max_rollbacks < 0:
            raise ValueError(f"max_rollbacks: expected an integer >= 0, got {max_rollbacks!r}")
        self.manager, self.max_rollbacks, self.fingerprint = manager, max_rollbacks, fingerprint
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.scheduler, self.scaler = scheduler, scaler
        self.tracker = tracker or NullTracker()
        self.records: list[RollbackRecord] = []

    def recover(self, signal: TrainingDiverged | LossSpikeRollback, live: LoopState,
                per_epoch: int) -> tuple[LoopState, dict[str, Any]]:
        """Restores the newest valid checkpoint before the trouble ``signal`` reports into the model,
        optimizer, scheduler, scaler and RNGs, and returns the loop state to continue from (the
        checkpoint's, at ``live``'s data position) with the callback states the checkpoint saved.
        ``per_epoch``: batches per epoch, to count the batches skipped across epoch boundaries.

        Raises:
            TrainingDiverged, LossSpikeRollback: ``signal`` itself when ``max_rollbacks`` is 0.
            RollbackFailed: ``max_rollbacks`` spent, or no checkpoint before the trouble.
        """
        if self.max_rollbacks == 0:
            raise signal
        start = trouble_start(signal)
        if len(self.records) >= self.max_rollbacks:
            raise RollbackFailed(f"{signal} again after {len(self.records)} rollbacks (train.max_rollbacks: "
                                 f"{self.max_rollbacks}); lower train.lr, set train.clip_grad_norm or check the data")
        found = self._checkpoint_before(start)
        if found is None:
            raise RollbackFailed(f"{signal}; no valid training checkpoint before step {start} to roll back to "
                                 "(settings checkpoint.every_steps takes them more often)")
        name, saved = found
        generator_now = self.generator.get_state()
        state = LoopState()
        state.load_state_dict(restore_training_state(saved, self.model, self.optimizer, generator=self.generator,
                                                     scheduler=self.scheduler, scaler=self.scaler))
        skipped = self._move_past(state, live, generator_now, per_epoch)
        record = RollbackRecord(len(self.records) + 1, live.global_step, start, name, state.global_step, skipped,
                                str(signal))
        self.records.append(record)
        self._record(record)
        return state, dict(saved.get("callbacks") or {})

    def _checkpoint_before(self, start: int) -> tuple[str, dict[str, Any]] | None:
        """The newest committed training checkpoint of this configuration taken before step
        ``start`` that verifies, loaded; checkpoints that do not verify are skipped, logged."""
        if self.manager is None:
            return None
        self.manager.wait()  # a save in flight is committed (or raises) before the tier is read
        for name in reversed(self.manager.list("training")):
            if self.manager.describe("training", name).get("step", start) >= start:
                continue
            try:
                saved = self.manager.load_checkpoint("training", name)
            except CheckpointCorrupt as exc:
                logger.warning("rollback: skipped checkpoint training/%s: %s", name, exc)
                continue
            if self.fingerprint is None or (saved.get("extra") or {}).get("fingerprint") == self.fingerprint:
                return name, saved
        return None

    def _move_past(self, state: LoopState, live: LoopState, generator_now: torch.Tensor, per_epoch: int) -> int:
        """Puts the restored ``state`` at ``live``'s data position (the batches in between are
        skipped) and returns how many batches that skips. The counters of skipped and overflowed
        steps keep counting over the whole training."""
        skipped = (live.epoch - state.epoch) * per_epoch + live.batch_in_epoch - state.batch_in_epoch
        same_epoch = live.epoch == state.epoch and state.batch_in_epoch > 0
        state.epoch, state.batch_in_epoch = live.epoch, live.batch_in_epoch
        state.epoch_generator_state = live.epoch_generator_state
        if not same_epoch:  # none of the batches of the epoch the training resumes in was trained on
            state.epoch_sums = None
        self.generator.set_state(generator_now)  # later epochs shuffle as they would have
        state.skipped_steps, state.overflow_steps, state.consecutive_skips = live.skipped_steps, live.overflow_steps, 0
        state.timing = live.timing
        return skipped

    def _record(self, record: RollbackRecord) -> None:
        line = f"train: {record.describe()}"
        logger.warning("%s", line)
        print(line, flush=True)
        self.tracker.log_metric("train/rollbacks", float(record.number), record.step)
        self.tracker.log_metric("train/rollback_batches_skipped", float(record.batches_skipped), record.step)
        self.tracker.set_tags({"rollbacks": record.number,
                               f"rollback.{record.number}": (f"step {record.step} -> training/{record.checkpoint} "
                                                             f"(step {record.checkpoint_step}), "
                                                             f"{record.batches_skipped} batches skipped")})

    def as_dicts(self) -> list[dict[str, Any]]:
        """The rollbacks so far, JSON-safe (for the run summary)."""
        return [asdict(r) for r in self.records]

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.as_dicts()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        records = [RollbackRecord(**r) for r in state["records"]]
        if len(records) > len(self.records):
            self.records = records


class BestWeights(Callback):
    """Keeps a CPU copy of the weights at the end of the best epoch by ``metric`` (``mode``: min
    or max, compared by :func:`ml.metrics.is_improvement`); :meth:`restore` loads them back.

    The copy is replaced, never written in place, so a checkpoint snapshot of the previous copy
    that is still being written stays intact. Its ``state_dict()`` (metric, best value, epoch and
    the weights) is saved in training checkpoints.
    """

    state_key = "restore_best"

    def __init__(self, model: nn.Module, metric: str, mode: str) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode: expected min or max, got {mode!r}")
        self.model, self.metric, self.mode = model, metric, mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None or not is_improvement(self.best, float(value), self.mode):
            return
        self.best, self.best_epoch = float(value), state.epoch
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def restore(self) -> int | None:
        """Loads the best epoch's weights into the model; returns that epoch (None: no epoch had a
        finite value, and the weights are left as they are)."""
        if self.weights is None:
            return None
        self.model.load_state_dict(self.weights)
        return self.best_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_epoch": self.best_epoch,
                "weights": dict(self.weights) if self.weights is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state["metric"], state["mode"]) != (self.metric, self.mode):
            raise ValueError(f"restore_best state is for {state['metric']}:{state['mode']}, this training keeps "
                             f"{self.metric}:{self.mode}")
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        weights = state["weights"]
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()} if weights else None
