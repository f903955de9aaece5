"""evaluate: test metrics and the confusion matrix, as DVC metrics/plots and on the training run."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ml.config import load_params
from ml.evaluation import evaluate
from ml.io import read_json
from ml.tracking import MlflowTracker
from tasks.entry import stage_main


def run(params_path: str = "params.yaml") -> dict[str, Any]:
    params = load_params(params_path)
    cfg = params.evaluate
    evaluation = evaluate(cfg, params.train.model_dir, params.data.processed_dir)
    run_id = read_json(params.train.run_file)["run_id"]
    tracker = MlflowTracker.attach(params.tracking, run_id)
    scalars = {f"test_{k}": v for k, v in evaluation.metrics.items() if isinstance(v, float)}
    tracker.log_metrics(scalars, step=0)
    for path in (cfg.metrics_file, cfg.predictions_file, cfg.confusion_png):
        tracker.log_artifact(path, "evaluation")
    return {"run_id": run_id, **scalars}


evaluate_task = task(run, name="evaluate", cache_policy=NO_CACHE)

if __name__ == "__main__":
    stage_main("evaluate", run)
