"""prepare: raw source -> data/raw -> data/processed/{train,val,test}.parquet, if it keeps the data contract."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ml.config import flatten, load_params
from ml.data.contract import load_contract
from ml.data.prepare import prepare
from tasks.entry import stage_main, stage_run


def run(params_path: str = "params.yaml", parent_run_id: str | None = None) -> dict[str, Any]:
    params = load_params(params_path)
    cfg = params.data
    with stage_run("prepare", parent=parent_run_id) as tracker:
        tracker.log_params({**flatten(cfg, "data."), **flatten(params.contract, "contract.")})
        contract = load_contract(params.contract.path)
        schema = prepare(cfg, contract, params.contract.allow_missing_classes)
        summary = {"source": schema.source, "features": len(schema.features), "classes": schema.num_classes,
                   "processed_dir": cfg.processed_dir, "contract": contract.reference()}
        tracker.set_tags({"dataset_source": schema.source, "contract_digest": contract.digest})
    return summary


# DVC decides what is stale; Prefect's own cache would only hide a changed input from it.
prepare_task = task(run, name="prepare", cache_policy=NO_CACHE)

if __name__ == "__main__":
    stage_main("prepare", run)
