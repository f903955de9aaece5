"""The training observers the train stage attaches to the loop, from params and the tracking
settings (:class:`ml.settings.TrackingConfig`): live TensorBoard scalars and weight/gradient
histograms, the anomaly monitor, the progress bar, per-epoch validation confusion matrices, and the
end-of-run summary report.

TensorBoard: one writer into ``<tracking.tensorboard_dir>/<run id>`` (:func:`ml.observe.tensorboard.tensorboard_root`),
flushed every few seconds while the run trains; at the end its directory is logged under the
run's ``histograms/`` artifacts and removed.

    observers = Observers(params, tracker, schema, settings.tracking)
    result = train(..., hook_factory=observers.hooks)
    observers.close()          # also when training failed: histograms and events are logged
    observers.finish(result)   # summary.md and timing metrics
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.train.loop import Callback, LoopState
from ml.train.schedule import optimizer_steps

logger = logging.getLogger(__name__)


class ConfusionPerEpoch(Callback):
    """A validation confusion matrix (JSON and PNG) under ``confusion/`` after every epoch."""

    def __init__(self, model: torch.nn.Module, x_val: np.ndarray, y_val: np.ndarray, labels: list[str],
                 tracker: Any, workdir: Path) -> None:
        self.model, self.x, self.y, self.labels = model, x_val, y_val, labels
        self.tracker, self.workdir = tracker, workdir

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        import json

        from ml.model.evaluate import classification_metrics, render_confusion
        from ml.model.predict import inference_model, predict

        was_training = self.model.training
        pred = predict(inference_model(self.model), self.x).classes
        self.model.train(was_training)
        evaluation = classification_metrics(self.y, pred, self.labels)
        name = f"epoch-{state.epoch:04d}"
        self.tracker.log_text(json.dumps({"epoch": state.epoch, "step": state.global_step, "labels": self.labels,
                                          "matrix": evaluation.confusion}), f"confusion/{name}.json")
        png = self.workdir / f"{name}.png"
        render_confusion(evaluation, png, title=f"Confusion matrix (validation, epoch {state.epoch})")
        self.tracker.log_artifact(png, "confusion")
        png.unlink(missing_ok=True)


class Observers:
    """Builds the observer hooks for one training run and logs what they gathered."""

    def __init__(self, params: Any, tracker: Any, schema: Any, tracking: Any) -> None:
        self.params, self.tracker, self.schema, self.tracking = params, tracker, schema, tracking
        self.workdir = Path(tempfile.mkdtemp(prefix="mlops-observers-"))
        self.histograms: Any = None
        self.tensorboard_dir: Path | None = None
        self.tensorboard_writer: Any = None
        self.monitor: Any = None
        self.progress: Any = None
        self._closed = False

    def hooks(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, splits: Any) -> list[Any]:
        from ml.observe.anomaly import AnomalyMonitor
        from ml.observe.progress import ProgressHook
        from ml.observe.tensorboard import SharedWriterHistograms, TrainingScalars

        tracking, train = self.tracking, self.params.train
        tracker = self.tracker
        hooks: list[Any] = []
        writer = self._tensorboard()
        if tracking.histogram_every_steps:
            self.histograms = SharedWriterHistograms(writer, model, self.tensorboard_dir,
                                                     tracking.histogram_every_steps, tracker=tracker,
                                                     artifact_path="histograms")
            hooks.append(self.histograms)
        cuda = any(p.is_cuda for p in model.parameters())
        hooks.append(TrainingScalars(writer, optimizer, cuda=cuda))
        self.monitor = AnomalyMonitor(self.params.anomaly, tracker)
        hooks.append(self.monitor)
        total = optimizer_steps(len(splits.y_train), train.batch_size, train.accumulate_steps, train.epochs)
        console = getattr(tracker, "console", None)
        stream = console.original("stderr") if console is not None else None
        self.progress = ProgressHook(total, tracking.progress, stream,
                                     batch_size=train.batch_size * train.accumulate_steps, epochs=train.epochs)
        hooks.append(self.progress)
        if tracking.confusion_every_epoch:
            hooks.append(ConfusionPerEpoch(model, splits.x_val, splits.y_val, list(self.schema.classes), tracker,
                                           self.workdir))
        return hooks

    def _tensorboard(self) -> Any:
        """The run's one TensorBoard writer, opened on first use; says where it writes."""
        from ml.observe.tensorboard import open_writer, tensorboard_root

        if self.tensorboard_writer is None:
            run = getattr(self.tracker, "run_id", None) or self.workdir.name
            self.tensorboard_dir = tensorboard_root(self.tracking.tensorboard_dir) / run
            self.tensorboard_writer = open_writer(self.tensorboard_dir)
            logger.info("train: TensorBoard: tensorboard --logdir %s", self.tensorboard_dir)
            print(f"train: TensorBoard while training: tensorboard --logdir {self.tensorboard_dir}", flush=True)
        return self.tensorboard_writer

    def close(self) -> None:
        """Ends the progress bar, logs anomaly events, and the TensorBoard directory (scalars and
        histograms). Safe to call again."""
        if self._closed:
            return
        self._closed = True
        for observer in (self.progress, self.monitor, self.histograms):
            if observer is None:
                continue
            try:
                observer.close()
            except Exception:  # noqa: BLE001 - one observer's failure must not hide the others' output
                logger.exception("closing %s failed", type(observer).__name__)
        if self.tensorboard_writer is not None and self.histograms is None:  # else the histograms logged it
            from ml.observe.tensorboard import log_directory

            self.tensorboard_writer.close()
            try:
                log_directory(self.tracker, self.tensorboard_dir, "histograms")
            except Exception:  # noqa: BLE001 - as above
                logger.exception("logging the TensorBoard directory failed")
        if self.tensorboard_dir is not None:
            shutil.rmtree(self.tensorboard_dir, ignore_errors=True)

    def finish(self, result: Any) -> str:
        """Logs ``summary.md`` and the step-timing summary metrics; returns the report."""
        from ml.observe.report import memory_totals, summary_report

        state = result.state
        sampler = getattr(self.tracker, "sampler", None)
        resources = {**(sampler.peaks() if sampler is not None else {}), **memory_totals()}
        report = summary_report(state.history, resources=resources, timing=state.timing,
                                checkpoints=result.checkpoint_stats or None,
                                anomalies=self.monitor.events if self.monitor else None,
                                stop_reason=state.stop_reason)
        if result.resume_note:
            report += f"\n\n## Checkpoint resume\n\n{result.resume_note}\n"
        self.tracker.log_text(report, "summary.md")
        self.tracker.log_metrics({f"timing/{k}": v for k, v in state.timing.summary().items()}, step=state.global_step)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return report

