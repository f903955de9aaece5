"""prepare: raw source -> data/raw -> data/processed/{train,val,test}.parquet."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ml.config import load_params
from ml.data import prepare
from tasks.entry import stage_main


def run(params_path: str = "params.yaml") -> dict[str, Any]:
    cfg = load_params(params_path).data
    schema = prepare(cfg)
    return {"source": schema.source, "features": len(schema.features), "classes": schema.num_classes,
            "processed_dir": cfg.processed_dir}


# DVC decides what is stale; Prefect's own cache would only hide a changed input from it.
prepare_task = task(run, name="prepare", cache_policy=NO_CACHE)

if __name__ == "__main__":
    stage_main("prepare", run)
