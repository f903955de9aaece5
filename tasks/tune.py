"""tune: an Optuna study in an MLflow run of its own (kind ``tuning``), its trials nested in it; the
best trial becomes the trained model that evaluate and register continue from.

    python -m tasks.tune [--params params.yaml]
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ml.config import flatten, load_params
from ml.data.prepare import Schema
from ml.provenance import dataset_version, git_info
from ml.settings import load_settings
from tasks.entry import flow_run_tags, stage_main, stage_run


def run(params_path: str = "params.yaml", parent_run_id: str | None = None, workers: int = 1) -> dict[str, Any]:
    """Runs ``tune.n_trials`` more trials of the study in ``tune.storage``, in this process or in
    ``workers`` worker processes (:mod:`ml.tune.workers`), then writes the best trial's weights to
    ``train.model_dir`` and its summary to ``train.run_file``."""
    from ml.tune.study import STUDY_TAG, adopt_best_trial, open_study, redacted_storage, run_study
    from ml.tune.workers import WorkerPool, check_workers, study_context

    params, tracking = load_params(params_path), load_settings().tracking
    check_workers(workers, params.tune.storage)
    tune, processed = params.tune, params.data.processed_dir
    schema = Schema.read(processed)
    dataset = dataset_version(processed, schema.source)
    git = git_info()
    shared = {"git_commit": git.commit, "git_branch": git.branch, "git_dirty": git.dirty,
              "dataset_md5": dataset.md5, "dataset_source": dataset.source, **flow_run_tags()}
    storage = redacted_storage(tune.storage)
    with stage_run("tune", tracking=tracking, run_name=f"tune-{tune.study_name}", parent=parent_run_id, kind="tuning",
                   tags={**shared, STUDY_TAG: tune.study_name, "optuna_storage": storage}) as study_run:
        study = open_study(tune)  # inside: Optuna's notices go to the stage's console log
        study_run.log_params({**flatten(tune, "tune."), "tune.storage": storage, **flatten(params.train, "train."),
                              "data.processed_dir": processed})
        study_run.set_tags({"tune_workers": workers})
        context = study_context(params, tracking, study_run.run_id, shared, dataset=dataset, git=git)
        study_run.log_dataset(context.train_frame, dataset, "training")
        pool = WorkerPool(params_path, workers, to_log=getattr(study_run.console, "to_log", None))
        outcome = run_study(study, context, study_run, optimize=pool.optimize if workers > 1 else None)
        trained = adopt_best_trial(outcome, params.train, tune, study_run.client)
    return {**outcome.to_dict(), "study_run_id": study_run.run_id, "run_id": trained["run_id"],
            "model_uri": trained["model_uri"], "final": trained["final"]}


tune_task = task(run, name="tune", cache_policy=NO_CACHE)

if __name__ == "__main__":
    stage_main("tune", run)
