"""One optimizer step: micro-batches in, the loss and the gradient norm out, as tensors.

Everything that shapes a step (mixed precision, loss scaling, gradient accumulation, clipping)
belongs here, in one place; the loop only decides which batch comes next and what to record.
Nothing here calls ``.item()``: the outputs stay on the device, so a step never waits for the GPU
just to report its loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StepOutput:
    """What one optimizer step computed, as detached device tensors.

    Attributes:
        loss: Mean cross-entropy over the step's samples (0-d).
        grad_norm: Global L2 norm of the gradients the step applied (0-d; NaN/inf when a gradient is).
        correct: Samples whose arg-max prediction matched the target, from the logits of the forward
            pass (weights before the update, dropout active), for the epoch's running accuracy (0-d).
        samples: Samples in the step.
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor
    correct: torch.Tensor
    samples: int


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> StepOutput:
    """Forward and backward over ``micro_batches`` (gradients accumulated, each micro-batch's loss
    weighted by its share of the samples, so the step equals one over their concatenation), then
    ``optimizer.step()``.

    Gradients are cleared before the backward pass, not after the update, so hooks that run after
    the step (histograms) still see the gradients the step applied.
    """
    if not micro_batches:
        raise ValueError("micro_batches: expected at least one (inputs, targets) pair")
    total = sum(len(targets) for _, targets in micro_batches)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = correct = None
    for inputs, targets in micro_batches:
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits, targets)
        if len(micro_batches) > 1:
            loss = loss * (len(targets) / total)
        loss.backward()
        hits = (logits.detach().argmax(dim=1) == targets).sum()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        correct = hits if correct is None else correct + hits
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss_sum.device)
    optimizer.step()
    return StepOutput(loss_sum, norm.detach(), correct, total)
