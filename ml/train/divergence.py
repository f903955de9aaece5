"""Training that diverged: the error that ends it once skipping steps no longer helps.

A step whose loss or gradients are not finite is skipped where it is computed
(:func:`ml.train.step.train_step`) and counted by the loop (:class:`ml.train.loop.LoopState`);
``train.max_skipped_steps`` skipped steps in a row end the run with :class:`TrainingDiverged`.
"""

from __future__ import annotations

from ml.errors import PipelineError


class TrainingDiverged(PipelineError):
    """``consecutive`` steps in a row, up to ``step``, had a non-finite loss or gradients.

    A :class:`ml.errors.PipelineError`: entry points print its one line and exit non-zero. Its
    usual causes are the user's (a learning rate too high, bad rows in the data)."""

    exit_code = 6

    def __init__(self, step: int, consecutive: int) -> None:
        self.step, self.consecutive = step, consecutive
        super().__init__(f"training diverged: {consecutive} steps in a row up to step {step} had a non-finite "
                         f"loss or gradients and were skipped (train.max_skipped_steps); lower train.lr, set "
                         f"train.clip_grad_norm or check the data")
