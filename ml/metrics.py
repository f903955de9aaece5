"""The one table of metric directions and the one "is this an improvement" rule.

Milestones, early stopping, tuning, the summary report and the champion/challenger gate all ask
which way a metric improves; they ask here, so ``val_loss`` cannot be "min" in one place and
"max" in another.
"""

from __future__ import annotations

import math

# Metrics the pipeline produces, and the direction in which each one improves.
DIRECTIONS: dict[str, str] = {
    "val_loss": "min",
    "val_accuracy": "max",
    "train_loss": "min",
    "train_accuracy": "max",
    "test_loss": "min",
    "test_accuracy": "max",
    "accuracy": "max",
    "loss": "min",
}
# Names that read as a cost, for metrics outside the table (a user's own, a timing).
_MIN_HINTS = ("loss", "error", "mse", "mae", "rmse", "perplexity", "_ms", "wait", "latency")


def direction(metric: str) -> str:
    """``"min"`` or ``"max"``: from the table, else ``"min"`` for names that read as a cost."""
    if metric in DIRECTIONS:
        return DIRECTIONS[metric]
    lowered = metric.lower()
    return "min" if any(hint in lowered for hint in _MIN_HINTS) else "max"


def optuna_direction(metric: str) -> str:
    """The direction as Optuna spells it."""
    return "minimize" if direction(metric) == "min" else "maximize"


def is_improvement(best: float | None, value: float, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (None: nothing to beat yet).
    NaN and infinities never count as an improvement."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta
