"""validate: the Great Expectations data gate over every split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ml.config import flatten, load_params
from ml.data.validate import validate
from tasks.entry import stage_main, stage_run


def run(params_path: str = "params.yaml", parent_run_id: str | None = None) -> dict[str, Any]:
    params = load_params(params_path)
    with stage_run("validate", parent=parent_run_id) as tracker:
        tracker.log_params(flatten(params.validate, "validate."))
        try:
            report = validate(params.validate, params.data.processed_dir)
        finally:
            if Path(params.validate.report).is_file():
                tracker.log_artifact(params.validate.report, "data")
    return {"success": report["success"], "report": params.validate.report,
            "expectations": {name: split["evaluated"] for name, split in report["splits"].items()}}


validate_task = task(run, name="validate", cache_policy=NO_CACHE)

if __name__ == "__main__":
    stage_main("validate", run)
