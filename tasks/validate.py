"""validate: the Great Expectations data gate over every split."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ml.config import load_params
from ml.validation import validate
from tasks.entry import stage_main


def run(params_path: str = "params.yaml") -> dict[str, Any]:
    params = load_params(params_path)
    report = validate(params.validate, params.data.processed_dir)
    return {"success": report["success"], "report": params.validate.report,
            "expectations": {name: split["evaluated"] for name, split in report["splits"].items()}}


validate_task = task(run, name="validate", cache_policy=NO_CACHE)

if __name__ == "__main__":
    stage_main("validate", run)
