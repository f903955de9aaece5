"""The tracking seam: the training loop talks to a :class:`Tracker`, never to MLflow.

:class:`NullTracker` lets everything run with nothing attached; :class:`MlflowTracker` records a
run in MLflow (the embedded SQLite store or an ``mlflow server``).
"""

from __future__ import annotations

import getpass
import platform
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ml.config import TrackingConfig


class Tracker(Protocol):
    """What the loop and the stages may record. Every method is cheap to call or a no-op."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
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


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "postgresql:", "mysql:")) or "://" not in uri


def configure_mlflow(cfg: TrackingConfig) -> Any:
    """Points MLflow at ``cfg.uri`` (registry included) and returns a client. Called at run time only."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(cfg.uri)
    mlflow.set_registry_uri(cfg.uri)
    return MlflowClient(tracking_uri=cfg.uri, registry_uri=cfg.uri)


def ensure_experiment(client: Any, cfg: TrackingConfig) -> str:
    """The experiment's id, creating it (artifacts under ``cfg.artifact_root`` on a local store)."""
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = Path(cfg.artifact_root).resolve().as_uri() if is_local_store(cfg.uri) else None
    return client.create_experiment(cfg.experiment, artifact_location=location)


def machine_tags() -> dict[str, str]:
    """Who ran it, where, and with what: recorded on every run without being asked."""
    import torch

    return {
        "host": socket.gethostname(),
        "os_user": getpass.getuser(),
        "mlflow.user": getpass.getuser(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }


class MlflowTracker:
    """A :class:`Tracker` over one MLflow run."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self._closed = False

    @classmethod
    def start(cls, cfg: TrackingConfig, run_name: str, tags: Mapping[str, Any] | None = None) -> MlflowTracker:
        """Creates a run in ``cfg.experiment``; its name ends in the run id's first 6 characters."""
        client = configure_mlflow(cfg)
        experiment_id = ensure_experiment(client, cfg)
        run = client.create_run(experiment_id, run_name=run_name,
                                tags={**machine_tags(), **{k: str(v) for k, v in (tags or {}).items()}})
        client.set_tag(run.info.run_id, "mlflow.runName", f"{run_name}-{run.info.run_id[:6]}")
        return cls(client, run.info.run_id)

    @classmethod
    def attach(cls, cfg: TrackingConfig, run_id: str) -> MlflowTracker:
        """Logs into an existing run (evaluate adds its results to the training run)."""
        client = configure_mlflow(cfg)
        client.get_run(run_id)
        return cls(client, run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dataset(self, frame: Any, version: Any, context: str) -> None:
        """Records the dataset version as a run input (digest = the DVC md5)."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        dataset = mlflow.data.from_pandas(frame, source=str(Path(version.path).resolve()),
                                          name=Path(version.path).name, digest=version.md5, targets="label")
        tags = [InputTag("mlflow.data.context", context), InputTag("dvc_md5", version.md5),
                InputTag("raw_source", version.source), InputTag("git_commit", version.git_commit)]
        self.client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(), tags)])

    def log_model(self, model: Any, example: Any) -> str:
        """Logs a PyTorch model with its signature and an input example; returns its model URI."""
        import mlflow
        import mlflow.pytorch
        from mlflow.models import infer_signature

        import torch

        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        signature = infer_signature(example, output)
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                                            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        return info.model_uri

    def close(self, status: str = "FINISHED") -> None:
        if not self._closed:
            self._closed = True
            self.client.set_terminated(self.run_id, status=status)
