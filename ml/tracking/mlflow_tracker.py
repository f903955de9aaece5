"""Tracking in MLflow: :class:`MlflowTracker` records a run in the embedded SQLite store or an
``mlflow server`` behind the :class:`ml.tracking.base.Tracker` seam, with machine capture, the
metric buffer, system metrics and spool replay."""

from __future__ import annotations

import getpass
import logging
import os
import platform
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ml.settings import TrackingConfig


_logger = logging.getLogger(__name__)


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "postgresql:", "mysql:")) or "://" not in uri


def resolve_uri(uri: str) -> str:
    """A relative SQLite URI made absolute against the current directory. MLflow keeps one database
    engine per URI string, so a relative one would keep pointing at the first directory it was
    used in after the process changes directory."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def configure_mlflow(cfg: TrackingConfig) -> Any:
    """Points MLflow at ``cfg.uri`` (registry included) and returns a client. Called at run time only.

    MLflow's own two lines per finished run on a tracking server (a run and an experiment URL on
    stdout, outside any run's console capture) are turned off unless the user set
    ``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``: the stages and flows print the URLs that matter."""
    import mlflow
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    uri = resolve_uri(cfg.uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: Any, cfg: TrackingConfig) -> str:
    """The experiment's id, creating it (artifacts under ``cfg.artifact_root`` on a local store)."""
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = Path(cfg.artifact_root).resolve().as_uri() if is_local_store(cfg.uri) else None
    return client.create_experiment(cfg.experiment, artifact_location=location)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_inventory() -> tuple[list[dict[str, Any]], str | None]:
    """GPUs through NVML as [{name, memory_total_mb}], or ([], why not)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver, no library, no device: all mean "no GPU"
        return [], f"NVML unavailable: {exc.__class__.__name__}: {exc}".strip()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append({"name": name.decode() if isinstance(name, bytes) else str(name),
                         "memory_total_mb": round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20)})
        return gpus, None if gpus else "NVML found no GPU"
    finally:
        pynvml.nvmlShutdown()


def machine_tags() -> dict[str, str]:
    """Who ran it, where, on what hardware, with which software: on every run without being asked."""
    import psutil
    import torch

    gpus, no_gpu = gpu_inventory()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    tags = {
        "host": socket.gethostname(),
        "os_user": getpass.getuser(),
        "mlflow.user": getpass.getuser(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(cudnn) if cudnn else "none",
        "cpu_model": _cpu_model(),
        "cpu_cores_logical": str(psutil.cpu_count(logical=True)),
        "cpu_cores_physical": str(psutil.cpu_count(logical=False)),
        "memory_total_gb": f"{psutil.virtual_memory().total / 2**30:.1f}",
        "gpu_count": str(len(gpus)),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "pid": str(os.getpid()),
    }
    for i, gpu in enumerate(gpus):
        tags[f"gpu{i}"] = f"{gpu['name']} ({gpu['memory_total_mb']} MiB)"
    if no_gpu:
        tags["gpu_absent_reason"] = no_gpu[:500]
    for package in ("mlflow", "prefect", "dvc", "great_expectations", "optuna", "numpy"):
        try:
            from importlib.metadata import version

            tags[package] = version(package.replace("_", "-"))
        except Exception:  # noqa: BLE001 - not installed
            pass
    return tags


def run_url(uri: str, experiment_id: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The run's page in the MLflow UI: the server itself, or ``mlops up``'s UI for a local store."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else ui
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


class MlflowTracker:
    """A :class:`Tracker` over one MLflow run that never makes the training thread wait.

    Metrics go through a :class:`ml.tracking.buffer.MetricBuffer`: ``log_metric`` appends to a deque,
    a daemon thread sends ``log_batch`` chunks, and while the store is unreachable the chunks go to
    an fsync'd spool under ``cfg.spool_dir`` (``<run_id>.metrics.jsonl``) that is replayed in order
    once it is back, including by a later process (see :func:`replay_spools`). System metrics are
    sampled in the background into the same buffer; their peaks become ``system/peak/...`` metrics at close.
    SIGTERM/SIGINT drain the buffer before the process ends. Params, tags and artifacts are written
    synchronously (they are few, and not on the training step); a tag that fails during an outage is
    retried at close.
    """

    def __init__(self, client: Any, run_id: str, cfg: TrackingConfig, *, experiment_id: str | None = None,
                 system_metrics: bool = True) -> None:
        from ml.tracking.buffer import MetricBuffer, mlflow_batch_sender

        self.client = client
        self.run_id = run_id
        self.cfg = cfg
        self.experiment_id = experiment_id or client.get_run(run_id).info.experiment_id
        self.url = run_url(cfg.uri, self.experiment_id, run_id)
        self.buffer = MetricBuffer(mlflow_batch_sender(client, run_id),
                                   Path(cfg.spool_dir) / f"{run_id}.metrics.jsonl",
                                   flush_interval=cfg.flush_interval_s)
        self.log_metric = self.buffer.log  # the hot path: one deque append
        self.sampler = None
        self.console: Any = None
        self.counters: Any = None
        self.system_peaks: dict[str, float] = {}
        self._deferred_tags: dict[str, str] = {}
        self._closed = False
        self._previous_handlers: dict[int, Any] = {}
        self._install_signal_flush()
        if system_metrics:
            from ml.tracking.system import SystemMetricsSampler

            self.sampler = SystemMetricsSampler(self.buffer.log, cfg.system_metrics_interval_s)
            self.sampler.start()

    @classmethod
    def start(cls, cfg: TrackingConfig, run_name: str, tags: Mapping[str, Any] | None = None, *,
              parent_run_id: str | None = None, kind: str = "stage", system_metrics: bool = True) -> MlflowTracker:
        """Creates a run in ``cfg.experiment`` (nested under ``parent_run_id`` when given) with the
        machine tags; its name ends in the run id's first 6 characters."""
        client = configure_mlflow(cfg)
        replay_spools(client, cfg)
        experiment_id = ensure_experiment(client, cfg)
        run_tags = {**machine_tags(), "mlops.run_kind": kind, **{k: str(v) for k, v in (tags or {}).items()}}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        client.set_tag(run.info.run_id, "mlflow.runName", f"{run_name}-{run.info.run_id[:6]}")
        return cls(client, run.info.run_id, cfg, experiment_id=experiment_id, system_metrics=system_metrics)

    @classmethod
    def attach(cls, cfg: TrackingConfig, run_id: str) -> MlflowTracker:
        """Logs into an existing run (evaluate adds its results to the training run)."""
        client = configure_mlflow(cfg)
        run = client.get_run(run_id)
        return cls(client, run_id, cfg, experiment_id=run.info.experiment_id, system_metrics=False)

    def log_metric(self, key: str, value: float, step: int) -> None:  # replaced per instance by buffer.log
        self.buffer.log(key, value, step)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        log = self.buffer.log
        for key, value in metrics.items():
            log(key, value, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        values = {k: str(v)[:8000] for k, v in tags.items()}
        try:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in values.items()])
        except Exception as exc:  # noqa: BLE001 - the store may be down mid-run; retried at close
            _logger.warning("tags not recorded yet (%s); retrying at close", exc.__class__.__name__)
            self._deferred_tags.update(values)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

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
        """Logs a PyTorch model with its signature and an input example; returns its model URI.

        The signature is the flat feature rows every architecture is called with; a model with a
        spec (:class:`ml.model.architectures.ModelSpec`) also carries it in the MLmodel metadata
        (``model_spec``, and ``input_shape``: the shape a row is viewed in, ``[in_features]`` when
        flat), so a reader of the registry sees the architecture and its input without loading it."""
        import mlflow
        import mlflow.pytorch
        from mlflow.models import infer_signature

        import torch

        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        signature = infer_signature(example, output)
        with mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                                            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                            metadata=_model_metadata(model))
        return info.model_uri

    def _install_signal_flush(self) -> None:
        """On SIGTERM/SIGINT: drain the buffer (or spool it), then the previous handler runs."""
        if threading.current_thread() is not threading.main_thread():
            return
        from ml.tracking.buffer import install_signal_flush

        self._previous_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        install_signal_flush(self.buffer)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)

    def close_buffer(self) -> Any:
        """Sends every buffered metric and stops the buffer, leaving the run's status alone (for a
        tracker attached to a run another stage owns)."""
        if not self._closed:
            self._closed = True
            self.counters = self.buffer.close()
            self._restore_signal_handlers()
        return self.counters

    def close(self, status: str = "FINISHED") -> Any:
        """Stops sampling, records peaks, drains every metric, closes the run; returns the buffer's
        counters (sent, spooled, replayed, still in the spool). Safe to call again."""
        if self._closed:
            return self.counters
        self._closed = True
        if self.sampler is not None:
            self.sampler.stop()
            self.system_peaks = self.sampler.peaks()
            for key, value in self.system_peaks.items():
                self.buffer.log(key, value, 0)
        self.counters = self.buffer.close()
        self._restore_signal_handlers()
        tags = {**self._deferred_tags, "tracking.metrics_sent": self.counters.sent,
                "tracking.metrics_spooled": self.counters.spooled,
                "tracking.metrics_replayed": self.counters.replayed,
                "tracking.metrics_in_spool": self.counters.spool_backlog}
        try:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001 - store down at close: the spool keeps the metrics
            _logger.warning("run %s not closed in the store (%s); %d metrics wait in %s", self.run_id, exc,
                            self.counters.spool_backlog, self.cfg.spool_dir)
        spool = Path(self.cfg.spool_dir) / f"{self.run_id}.metrics.jsonl"
        if self.counters.spool_backlog:
            _logger.warning("%d metrics of run %s wait in the spool %s; the next run against this store "
                            "replays them", self.counters.spool_backlog, self.run_id, spool)
        elif spool.exists() and spool.stat().st_size == 0:
            spool.unlink(missing_ok=True)
        return self.counters


def replay_spools(client: Any, cfg: TrackingConfig) -> int:
    """Sends the spools a crashed or cut-off process left under ``cfg.spool_dir``; returns points sent.

    Spool files are named after their run; one whose store is still unreachable stays for next time.
    """
    from ml.tracking.buffer import MetricBuffer, mlflow_batch_sender

    directory = Path(cfg.spool_dir)
    if not directory.is_dir():
        return 0
    replayed = 0
    for spool in sorted(directory.glob("*.metrics.jsonl")):
        run_id = spool.name.removesuffix(".metrics.jsonl")
        if spool.stat().st_size == 0:
            continue
        try:
            client.get_run(run_id)
        except Exception:  # noqa: BLE001 - store down or run gone: leave the spool alone
            continue
        buffer = MetricBuffer(mlflow_batch_sender(client, run_id), spool, register_atexit=False)
        counters = buffer.close(timeout=60)
        replayed += counters.replayed
        if counters.spool_backlog == 0:
            for leftover in (spool, spool.with_name(spool.name + ".offset")):
                leftover.unlink(missing_ok=True)
    return replayed


def _model_metadata(model: Any) -> dict[str, Any] | None:
    """The MLmodel metadata of a model with a spec: the spec, and the shape its rows are viewed in."""
    spec = getattr(model, "spec", None)
    if spec is None or not hasattr(spec, "to_json"):
        return None
    return {"model_spec": spec.to_json(), "input_shape": list(spec.input_shape or (spec.in_features,))}
