"""Callbacks that belong to training itself (not to observing it): early stopping.

The plateau rule lives here once: the direction of the watched metric comes from :mod:`ml.metrics`
and "is this an improvement" is :func:`ml.metrics.is_improvement`, as for milestones and tuning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ml.errors import ConfigError
from ml.metrics import direction, is_improvement
from ml.train.loop import Callback, LoopState

EARLY_STOPPING = "early stopping"  # how its stop reasons begin (the summary report keys on it)


class EarlyStopping(Callback):
    """Stops training after ``patience`` epochs in a row in which ``metric`` did not improve on its
    best value (strictly: NaN and infinities never improve). The stop comes at an epoch's end, so
    the run ends on a whole epoch; ``state.stop_reason`` says which value it waited for since when.

    Its count and best value are its ``state_dict()``, saved in training checkpoints, so a resumed
    run stops at the same epoch as a straight one.
    """

    state_key = "early_stopping"

    def __init__(self, patience: int, metric: str = "val_loss", *, key: str = "train.early_stopping_metric") -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"patience: expected an integer >= 1, got {patience!r}")
        self.patience, self.metric, self.mode, self.key = patience, metric, direction(metric), key
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.since_best = 0

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            raise ConfigError(f"{self.key}: expected one of {', '.join(sorted(metrics))}, got {self.metric!r}")
        value = float(metrics[self.metric])
        if is_improvement(self.best, value, self.mode):
            self.best, self.best_epoch, self.since_best = value, state.epoch, 0
            return
        self.since_best += 1
        if self.since_best >= self.patience:
            since = (f"on {self.best:.6g} (epoch {self.best_epoch})" if self.best is not None
                     else "on any finite value")
            state.stop = True
            state.stop_reason = (f"{EARLY_STOPPING}: {self.metric} has not improved {since} for {self.since_best} "
                                 f"epoch{'s' if self.since_best != 1 else ''}; latest {value:.6g}")

    def state_dict(self) -> dict[str, Any]:
        """The best value, its epoch and the epochs since; JSON-safe (a best that never was is None)."""
        return {"metric": self.metric, "best": self.best, "best_epoch": self.best_epoch, "since_best": self.since_best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["metric"] != self.metric:
            raise ValueError(f"early stopping state is for {state['metric']!r}, this run watches {self.metric!r}")
        best = state["best"]
        self.best = None if best is None or not math.isfinite(best) else float(best)
        self.best_epoch, self.since_best = state["best_epoch"], int(state["since_best"])
