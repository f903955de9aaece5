"""The learning-rate schedule of ``train.schedule`` and ``train.warmup_steps``, as a torch scheduler.

``constant`` and ``cosine`` are a :class:`torch.optim.lr_scheduler.LambdaLR` over the optimizer's
learning rate (a linear warmup from ``1 / (warmup_steps + 1)`` of it, then flat or a half cosine to
0 at the last optimizer step); ``onecycle`` is :class:`torch.optim.lr_scheduler.OneCycleLR` with the
warmup as its rising phase. Every scheduler here counts optimizer steps (``scheduler.step()`` once
per step, skipped steps included, so the rate follows the run's position) and keeps its position in
its ``state_dict()``, which training checkpoints store.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from ml.errors import ConfigError

SCHEDULES = ("constant", "cosine", "onecycle")


def optimizer_steps(samples: int, batch_size: int, accumulate_steps: int, epochs: int) -> int:
    """Optimizer steps of a whole run: each epoch's batches in groups of ``accumulate_steps`` (the
    last group of an epoch may be shorter)."""
    batches = (samples + batch_size - 1) // batch_size
    return epochs * ((batches + accumulate_steps - 1) // accumulate_steps)


def check_warmup(warmup_steps: int, total_steps: int, key: str = "train.warmup_steps") -> None:
    """A warmup must end inside the run (one line naming the key otherwise)."""
    if warmup_steps >= total_steps:
        raise ConfigError(f"{key}: expected fewer than the run's {total_steps} optimizer steps "
                          f"(epochs x ceil(batches per epoch / accumulate_steps)), got {warmup_steps}")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int,
                    total_steps: int) -> LRScheduler:
    """The scheduler for ``schedule`` over a run of ``total_steps`` optimizer steps.

    Raises:
        ConfigError: an unknown ``schedule``, or a warmup that does not end before the run does.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps: expected an integer >= 0, got {warmup_steps}")
    check_warmup(warmup_steps, total_steps)
    if schedule == "onecycle":
        max_lrs = [group["lr"] for group in optimizer.param_groups]
        # The peak at step index warmup_steps, as for the other schedules (OneCycleLR's rising
        # phase ends at pct_start * total_steps - 1), leaving the annealing phase at least one step.
        pct_start = min(warmup_steps + 1, max(total_steps - 1, 1)) / total_steps
        return OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total_steps, pct_start=pct_start,
                          cycle_momentum=False)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
