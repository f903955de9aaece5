"""One optimizer step: micro-batches in, the loss and the gradient norm out, as tensors.

Everything that shapes a step (mixed precision, loss scaling, gradient accumulation, clipping)
belongs here, in one place; the loop only decides which batch comes next and what to record.
The outputs stay on the device, so a step never waits for the GPU just to report its loss; the
one host read per step is the decision to skip it (are the loss and the gradient norm finite), as
GradScaler's own ``step()`` reads its overflow flag.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ml.train.distributed import all_ranks_true, ddp_module, grad_sync


@dataclass(frozen=True)
class StepOutput:
    """What one optimizer step computed, as detached device tensors.

    Attributes:
        loss: Mean cross-entropy over the step's samples (0-d).
        grad_norm: Global L2 norm of the step's gradients before clipping (0-d; NaN/inf when a
            gradient is).
        correct: Samples whose arg-max prediction matched the target, from the logits of the forward
            pass (weights before the update, dropout active), for the epoch's running accuracy (0-d).
        samples: Samples in the step.
        skipped: The loss or the gradients were not finite: no update, the gradients dropped.
        overflow: fp16 only: the loss was finite but the scaled gradients overflowed, and GradScaler
            skipped the update (and lowered its scale); not a divergence.
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor
    correct: torch.Tensor
    samples: int
    skipped: bool = False
    overflow: bool = False


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
               autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
               scaler: torch.amp.GradScaler | None = None, clip_grad_norm: float | None = None) -> StepOutput:
    """Forward and backward over ``micro_batches`` (gradients accumulated, each micro-batch's loss
    weighted by its share of the samples, so the step equals one over their concatenation), then
    ``optimizer.step()``.

    Gradients are cleared before the backward pass, not after the update, so hooks that run after
    the step (histograms) still see the gradients the step applied. ``autocast`` makes the context
    each forward pass and its loss run in (mixed precision: see :mod:`ml.train.speed`); backward
    runs outside it. With a ``scaler`` (fp16), the loss is scaled for backward and the gradients
    unscaled before their norm is taken; the scaler skips a step whose gradients overflowed.

    ``clip_grad_norm`` scales the (unscaled) gradients down to that global norm when they exceed
    it. A step whose loss or gradient norm is not finite is skipped: no ``optimizer.step()``, the
    gradients dropped (:attr:`StepOutput.skipped`).

    A ``model`` in DistributedDataParallel all-reduces the gradients once per step, in the last
    micro-batch's backward (``no_sync`` for the others), and a step is skipped on every rank when
    one rank's loss is not finite.
    """
    if not micro_batches:
        raise ValueError("micro_batches: expected at least one (inputs, targets) pair")
    total = sum(len(targets) for _, targets in micro_batches)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = correct = None
    for i, (inputs, targets) in enumerate(micro_batches):
        with grad_sync(model, last=i == len(micro_batches) - 1), autocast():
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits.float(), targets)
        if len(micro_batches) > 1:
            loss = loss * (len(targets) / total)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        hits = (logits.detach().argmax(dim=1) == targets).sum()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        correct = hits if correct is None else correct + hits
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = (torch.nn.utils.get_total_norm([p.grad for p in params]) if params
            else torch.zeros((), device=loss_sum.device))
    finite = torch.stack((loss_sum.isfinite(), norm.isfinite()))
    if ddp_module(model) is not None:  # each rank has its own loss: all take the same decision
        finite = all_ranks_true(finite)
    finite_loss, finite_norm = finite.tolist()
    # fp16: gradients that overflow under a finite loss are GradScaler's to skip; elsewhere a
    # non-finite loss or gradient is a diverged step.
    overflow = scaler is not None and finite_loss and not finite_norm
    skipped = not finite_loss or (not finite_norm and not overflow)
    if skipped:
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()   # the inf check unscale_ recorded lowers the scale as for an overflow
    else:
        if clip_grad_norm is not None and finite_norm:
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad_norm, norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return StepOutput(loss_sum, norm.detach(), correct, total, skipped, overflow)
