"""train: the PyTorch loop inside an MLflow run that records params, code, data, machine and
console, with tiered checkpoints and the training observers (histograms, anomalies, progress)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from ml.config import flatten, load_params
from ml.data.prepare import Schema
from ml.io import atomic_write_json
from ml.provenance import dataset_version, git_diff, git_info
from ml.settings import load_settings
from ml.observe.observers import Observers
from ml.train.stage import CheckpointContext, config_fingerprint, run_name, train
from tasks.entry import stage_main, stage_run


def run(params_path: str = "params.yaml", fresh: bool = False, parent_run_id: str | None = None) -> dict[str, Any]:
    """Trains, resuming from the newest valid checkpoint of the same configuration unless ``fresh``."""
    params, settings = load_params(params_path), load_settings()
    cfg, processed = params.train, params.data.processed_dir
    schema = Schema.read(processed)
    dataset = dataset_version(processed, schema.source)
    git = git_info()
    fingerprint = config_fingerprint(cfg, dataset.md5)
    tags = {"git_commit": git.commit, "git_branch": git.branch, "git_dirty": git.dirty,
            "dataset_md5": dataset.md5, "dataset_source": dataset.source, "config_fingerprint": fingerprint}
    with stage_run("train", tracking=settings.tracking, run_name=run_name(cfg), parent=parent_run_id, tags=tags,
                   system_metrics=True) as tracker:
        tracker.log_params({**flatten(cfg, "train."), **flatten(params.anomaly, "anomaly."),
                            **flatten(settings.tracking, "settings.tracking."),
                            **flatten(settings.checkpoint, "settings.checkpoint."), "data.processed_dir": processed})
        tracker.log_dataset(pd.read_parquet(Path(processed) / "train.parquet"), dataset, "training")
        if git.dirty:
            tracker.log_text(git_diff(), "git/diff.patch")
        if Path(params.validate.report).is_file():
            tracker.log_artifact(params.validate.report, "data")
        checkpoints = CheckpointContext(settings.checkpoint, fingerprint, run_id=tracker.run_id,
                                        dataset=dataset.to_dict(), git_commit=git.commit, fresh=fresh)
        observers = Observers(params, tracker, schema, settings.tracking)
        try:
            result = train(cfg, processed, tracker, checkpoints=checkpoints, hook_factory=observers.hooks)
        finally:
            observers.close()
        if result.resumed_from:
            tracker.set_tags({"resumed_from_checkpoint": result.resumed_from})
        if result.state.stop:
            tracker.set_tags({"stopped_early": result.state.stop_reason or "stopped by a hook"})
        example = pd.read_parquet(Path(processed) / "val.parquet").drop(columns=["label"]).head(5)
        model_uri = tracker.log_model(result.model, example.to_numpy(dtype="float32").copy())
        tracker.log_artifact(cfg.metrics_file, "metrics")
        observers.finish(result)
        summary = {"run_id": tracker.run_id, "model_uri": model_uri, "experiment": settings.tracking.experiment,
                   "run_url": tracker.url, "parent_run_id": parent_run_id, "dataset": dataset.to_dict(),
                   "git": {"commit": git.commit, "branch": git.branch, "dirty": git.dirty},
                   "resume": result.resume_note, "stopped_early": result.state.stop_reason,
                   "final": result.final_metrics, "restored_best_epoch": result.best_epoch,
                   "rollbacks": result.rollbacks}
        atomic_write_json(cfg.run_file, summary)
    return summary


train_task = task(run, name="train", cache_policy=NO_CACHE)

if __name__ == "__main__":
    stage_main("train", run, flags={"--fresh": "ignore training checkpoints and start from scratch"})
