"""train: the PyTorch loop inside an MLflow run that records params, code and dataset version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from ml.config import flatten, load_params
from ml.data import Schema
from ml.io import atomic_write_json
from ml.lineage import dataset_version, git_diff, git_info
from ml.tracking import MlflowTracker
from ml.training import run_name, train
from tasks.entry import stage_main


def flow_run_tags() -> dict[str, str]:
    """Links the MLflow run to the Prefect flow run it belongs to, when there is one."""
    from prefect.runtime import flow_run

    return {"prefect_flow_run_id": str(flow_run.id)} if flow_run.id else {}


def run(params_path: str = "params.yaml") -> dict[str, Any]:
    params = load_params(params_path)
    cfg, processed = params.train, params.data.processed_dir
    schema = Schema.read(processed)
    dataset = dataset_version(processed, schema.source)
    git = git_info()
    tracker = MlflowTracker.start(params.tracking, run_name(cfg), tags={
        "stage": "train", "git_commit": git.commit, "git_branch": git.branch, "git_dirty": git.dirty,
        "dataset_md5": dataset.md5, "dataset_source": dataset.source, **flow_run_tags()})
    try:
        tracker.log_params({**flatten(cfg, "train."), **flatten(params.tracking, "tracking."),
                            "data.processed_dir": processed})
        tracker.log_dataset(pd.read_parquet(Path(processed) / "train.parquet"), dataset, "training")
        if git.dirty:
            tracker.log_text(git_diff(), "git/diff.patch")
        if Path(params.validate.report).is_file():
            tracker.log_artifact(params.validate.report, "data")
        result = train(cfg, processed, tracker)
        example = pd.read_parquet(Path(processed) / "val.parquet").drop(columns=["label"]).head(5)
        model_uri = tracker.log_model(result.model, example.to_numpy(dtype="float32"))
        tracker.log_artifact(cfg.metrics_file, "metrics")
        summary = {"run_id": tracker.run_id, "model_uri": model_uri, "experiment": params.tracking.experiment,
                   "dataset": dataset.to_dict(), "git": {"commit": git.commit, "dirty": git.dirty},
                   "final": result.final_metrics}
        atomic_write_json(cfg.run_file, summary)
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()
    return summary


train_task = task(run, name="train", cache_policy=NO_CACHE)

if __name__ == "__main__":
    stage_main("train", run)
