"""When to checkpoint and which checkpoints to keep: pure decisions, no I/O.

Whether a metric improved is :func:`ml.metrics.is_improvement`, the one rule milestones share with
early stopping, tuning and the report.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ml.metrics import is_improvement

__all__ = ["TIERS", "is_improvement", "is_metric_name", "is_semver", "milestone_base_name", "retention_victims",
           "should_save", "training_checkpoint_name"]

TIERS = ("training", "milestone", "production")

# semver.org's regular expression, with [0-9] for \d so no other Unicode digits pass.
_SEMVER = re.compile(
    r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?")
METRIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def is_semver(version: str) -> bool:
    """Whether ``version`` is a semantic version (MAJOR.MINOR.PATCH[-pre][+build])."""
    return isinstance(version, str) and _SEMVER.fullmatch(version) is not None


def is_metric_name(metric: str) -> bool:
    """Metric names that may appear in milestone names and ``best_<metric>`` pointers."""
    return isinstance(metric, str) and METRIC_NAME.fullmatch(metric) is not None


def should_save(step: int, every_steps: int | None, last_save_time: float, now: float,
                every_seconds: float | None) -> bool:
    """Whether a training checkpoint is due after ``step``: every ``every_steps`` steps and/or once
    ``every_seconds`` have passed since the last save (either one set to None is off)."""
    by_steps = every_steps is not None and step % every_steps == 0
    by_time = every_seconds is not None and now - last_save_time >= every_seconds
    return by_steps or by_time


def training_checkpoint_name(step: int, epoch: int | None = None) -> str:
    """``step-00000120``; with an epoch, ``epoch-0003-step-00000120`` so that the state at the end
    of an epoch's last batch and the state after the epoch (same step) do not collide."""
    return f"step-{step:08d}" if epoch is None else f"epoch-{epoch:04d}-step-{step:08d}"


def milestone_base_name(metric: str, epoch: int, step: int) -> str:
    """``val_loss-epoch-0003-step-00000120`` (a suffix ``-2``, ``-3``... is added on a collision)."""
    return f"{metric}-epoch-{epoch:04d}-step-{step:08d}"


def retention_victims(committed: Sequence[str], keep: int, protected: Iterable[str] = ()) -> list[str]:
    """The checkpoints to delete so that ``keep`` remain: the oldest of ``committed`` (oldest
    first) beyond ``keep``, never one in ``protected`` (named by a pointer, or the one just
    committed).

    Raises:
        ValueError: ``keep`` is negative.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    spared = set(protected)
    return [n for n in committed[:max(len(committed) - keep, 0)] if n not in spared]
