"""register: a new model version, PendingManualApproval, with its lineage. It never moves an alias."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ml.config import load_params
from ml.errors import QualityGateFailed
from ml.io import atomic_write_json, read_json
from ml.tracking import configure_mlflow
from registry.approval import meets_quality_gate
from registry.store import register_version
from tasks.entry import should_retry, stage_main


def run(params_path: str = "params.yaml") -> dict[str, Any]:
    params = load_params(params_path)
    cfg = params.register
    trained = read_json(params.train.run_file)
    metrics = read_json(params.evaluate.metrics_file)
    passed, why = meets_quality_gate(metrics, cfg.min_test_accuracy)
    if not passed:
        raise QualityGateFailed(f"not registered: {why}")
    client = configure_mlflow(params.tracking)
    dataset = trained["dataset"]
    record = register_version(client, cfg.model_name, trained["model_uri"], trained["run_id"], tags={
        "source_run_id": trained["run_id"], "dataset_md5": dataset["md5"], "dataset_source": dataset["source"],
        "dataset_path": dataset["path"], "git_commit": trained["git"]["commit"],
        "test_accuracy": f"{metrics['accuracy']:.6f}", "quality_gate": why})
    summary = {"model_name": record.name, "version": record.version, "status": record.status,
               "run_id": record.run_id, "test_accuracy": metrics["accuracy"], "dataset_md5": dataset["md5"]}
    atomic_write_json(cfg.output, summary)
    return summary


register_task = task(run, name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
                     retry_condition_fn=should_retry)

if __name__ == "__main__":
    stage_main("register", run)
