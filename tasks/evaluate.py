"""evaluate: test metrics and the confusion matrix, as DVC metrics/plots and on the training run."""

from __future__ import annotations

import json
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ml.config import load_params
from ml.settings import load_settings
from ml.model.evaluate import evaluate
from ml.io import read_json
from ml.tracking.mlflow_tracker import MlflowTracker
from tasks.entry import stage_main, stage_run


def run(params_path: str = "params.yaml", parent_run_id: str | None = None) -> dict[str, Any]:
    """Evaluates on the test split in an evaluate run of its own; the test metrics and artifacts also
    go to the training run, so the model's run holds its evaluation."""
    params, tracking = load_params(params_path), load_settings().tracking
    cfg = params.evaluate
    run_id = read_json(params.train.run_file)["run_id"]
    with stage_run("evaluate", tracking=tracking, parent=parent_run_id, tags={"evaluated_run_id": run_id}) as tracker:
        evaluation = evaluate(cfg, params.train.model_dir, params.data.processed_dir)
        scalars = {f"test_{k}": v for k, v in evaluation.metrics.items() if isinstance(v, float)}
        training_run = MlflowTracker.attach(tracking, run_id)
        try:
            for target in (tracker, training_run):
                target.log_metrics(scalars, step=0)
                for path in (cfg.metrics_file, cfg.predictions_file, cfg.confusion_png):
                    target.log_artifact(path, "evaluation")
                target.log_text(json.dumps({"labels": evaluation.labels, "matrix": evaluation.confusion}, indent=1),
                                "evaluation/confusion_matrix.json")
        finally:
            training_run.close_buffer()
    return {"run_id": run_id, **scalars}


evaluate_task = task(run, name="evaluate", cache_policy=NO_CACHE)

if __name__ == "__main__":
    stage_main("evaluate", run)
