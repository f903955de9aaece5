"""The tracking seam: the training loop talks to a :class:`Tracker`, never to MLflow.

:class:`NullTracker` lets everything run with nothing attached; :class:`ml.tracking.mlflow_tracker.MlflowTracker`
records a run in MLflow. This module imports no MLflow (an import-linter contract keeps it so),
so the loop and the observers never load it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    """What the loop and the stages may record. Every method is cheap to call or a no-op."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metric(self, key: str, value: float, step: int) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Records nothing: for tests, notebooks and runs with tracking turned off."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metric(self, key: str, value: float, step: int) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass
