"""The tuning pipeline as one Prefect flow: prepare -> validate -> tune -> evaluate -> register, the
tuned model (the study's best trial) taking the place of the trained one.

    python -m flows.tuning [--params params.yaml] [--workers N]

dvc.lock is left alone: its train stage records ``train`` params, which did not produce a tuned model.
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow

from flows.training import next_steps, quiet_flow_console, start_pipeline_run, uses_local_store
from flows.workspace import in_workspace
from ml.errors import cli_errors
from tasks.evaluate import evaluate_task
from tasks.prepare import prepare_task
from tasks.register import register_task
from tasks.tune import tune_task
from tasks.validate import validate_task


@flow(name="tuning-pipeline", log_prints=True)
@in_workspace
def tuning_pipeline(params_path: str = "params.yaml", workers: int = 1) -> dict[str, Any]:
    """Each stage a nested MLflow run under one pipeline run, the trials nested in the tune stage's
    study run, run by ``workers`` processes sharing the study when more than one (ml.tune.workers);
    returns the registered version with the study's best trial."""
    from ml.config import flatten, load_params
    from ml.tune.study import redacted_storage

    pipeline = start_pipeline_run(params_path)
    parent = pipeline.run_id
    status = "FAILED"
    try:
        tune = load_params(params_path).tune
        pipeline.log_params({**flatten(tune, "tune."), "tune.storage": redacted_storage(tune.storage),
                             "tune.workers": workers})
        prepare_task(params_path, parent_run_id=parent)
        validate_task(params_path, parent_run_id=parent)
        tuned = tune_task(params_path, parent_run_id=parent, workers=workers)
        pipeline.set_tags({"study_run_id": tuned["study_run_id"], "optuna_study": tuned["study"],
                           "best_trial_number": tuned["best_trial"], "train_run_id": tuned["run_id"]})
        evaluate_task(params_path, parent_run_id=parent)
        registered = register_task(params_path, parent_run_id=parent)
        pipeline.set_tags({"registered_model": registered["model_name"],
                           "registered_version": registered["version"]})
        status = "FINISHED"
    finally:
        pipeline.close(status)
    return {**registered, "pipeline_run_id": parent, "pipeline_run_url": pipeline.url,
            "study": tuned["study"], "study_run_id": tuned["study_run_id"], "best_trial": tuned["best_trial"],
            "best_value": tuned["best_value"], "best_params": tuned["best_params"]}


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.tuning", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--workers", type=int, default=1,
                        help="trial processes sharing the study (tune.storage a file or database server); default 1")
    args = parser.parse_args(argv)
    from ml.config import load_params
    from ml.tune.objectives import select_rule
    from ml.tune.workers import check_workers

    tune = load_params(args.params).tune
    check_workers(args.workers, tune.storage)  # before Prefect starts
    select_rule(tune)  # tune.objectives and tune.select too
    quiet_flow_console()
    registered = tuning_pipeline(args.params, workers=args.workers)
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in registered["best_params"].items())
    print(f"Study {registered['study']}: best trial {registered['best_trial']} "
          f"({registered['best_value']:.4f}) with {params}")
    print(next_steps(registered, uses_local_store()))


if __name__ == "__main__":
    main()
