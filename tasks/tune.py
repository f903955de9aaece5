"""tune: an Optuna study in an MLflow run of its own (kind ``tuning``), its trials nested in it; the
best trial becomes the trained model that evaluate and register continue from.

    python -m tasks.tune [--params params.yaml]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from ml.config import flatten, load_params
from ml.data.prepare import Schema
from ml.provenance import dataset_version, git_info
from ml.settings import load_settings
from tasks.entry import flow_run_tags, stage_main, stage_run


def run(params_path: str = "params.yaml", parent_run_id: str | None = None) -> dict[str, Any]:
    """Runs ``tune.n_trials`` more trials of the study in ``tune.storage``, then writes the best
    trial's weights to ``train.model_dir`` and its summary to ``train.run_file``."""
    from ml.tracking.mlflow_tracker import MlflowTracker
    from ml.tune.study import STUDY_TAG, StudyContext, adopt_best_trial, open_study, redacted_storage, run_study

    params, tracking = load_params(params_path), load_settings().tracking
    tune, processed = params.tune, params.data.processed_dir
    schema = Schema.read(processed)
    dataset = dataset_version(processed, schema.source)
    git = git_info()
    shared = {"git_commit": git.commit, "git_branch": git.branch, "git_dirty": git.dirty,
              "dataset_md5": dataset.md5, "dataset_source": dataset.source, **flow_run_tags()}
    study = open_study(tune)
    storage = redacted_storage(tune.storage)
    with stage_run("tune", tracking=tracking, run_name=f"tune-{tune.study_name}", parent=parent_run_id, kind="tuning",
                   tags={**shared, STUDY_TAG: tune.study_name, "optuna_storage": storage}) as study_run:
        study_run.log_params({**flatten(tune, "tune."), "tune.storage": storage, **flatten(params.train, "train."),
                              "data.processed_dir": processed})
        train_frame = pd.read_parquet(Path(processed) / "train.parquet")
        study_run.log_dataset(train_frame, dataset, "training")
        example = pd.read_parquet(Path(processed) / "val.parquet").drop(columns=["label"]).head(5)
        context = StudyContext(params, study_run.run_id, dataset, git, train_frame,
                               example.to_numpy(dtype="float32").copy(), MlflowTracker.start, shared, tracking)
        outcome = run_study(study, context, study_run)
        trained = adopt_best_trial(outcome, params.train, tune, study_run.client)
    return {**outcome.to_dict(), "study_run_id": study_run.run_id, "run_id": trained["run_id"],
            "model_uri": trained["model_uri"], "final": trained["final"]}


tune_task = task(run, name="tune", cache_policy=NO_CACHE)

if __name__ == "__main__":
    stage_main("tune", run)
