"""validate: the data contract's Great Expectations suite over every split, then drift against a reference.

The drift reference is the champion's training split when ``drift.reference`` allows it and that
split is in the DVC cache with the contract's columns, else the contract's reference statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ml.config import flatten, load_params
from ml.data.contract import load_contract
from ml.data.drift import DriftThresholds
from ml.data.validate import format_failures, validate
from tasks.entry import stage_main, stage_run


def champion_training_split(model_name: str, features: tuple[str, ...]) -> tuple[Any, str]:
    """The champion's training split from the local DVC cache (by the ``dataset_md5`` tag of its
    version), or None and why not."""
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ml.data.dvc_cache import cached_files
    from ml.settings import load_settings
    from ml.tracking.mlflow_tracker import configure_mlflow
    from registry.store import champion

    try:
        client: MlflowClient = configure_mlflow(load_settings().tracking)
        current = champion(client, model_name)
    except MlflowException as exc:
        return None, f"registry unavailable ({str(exc).splitlines()[0][:120]})"
    if current is None:
        return None, f"{model_name} has no champion"
    md5 = current.tags.get("dataset_md5", "")
    files, _ = cached_files(md5)
    if files is None:
        return None, f"the training data of {model_name} v{current.version} is not in the local DVC cache"
    path = files.get("train.parquet")
    if path is None:
        return None, f"the training split of {model_name} v{current.version} is not in the local DVC cache"
    frame = pd.read_parquet(path)
    if [c for c in frame.columns if c != "label"] != list(features):
        return None, f"{model_name} v{current.version} was trained on other columns"
    return frame, f"champion {model_name} v{current.version} (dataset {md5})"


def run(params_path: str = "params.yaml", parent_run_id: str | None = None) -> dict[str, Any]:
    params = load_params(params_path)
    cfg, drift = params.validate, params.drift
    with stage_run("validate", parent=parent_run_id) as tracker:
        tracker.log_params({**flatten(cfg, "validate."), **flatten(params.contract, "contract."),
                            **flatten(drift, "drift."), "register.model_name": params.register.model_name})
        contract = load_contract(params.contract.path)
        tracker.set_tags({"contract_path": contract.path, "contract_digest": contract.digest})
        tracker.log_artifact(contract.path, "data/contract")
        reference, source = None, "contract"
        if drift.reference == "champion":
            reference, why = champion_training_split(params.register.model_name, contract.spec.feature_names)
            source = why if reference is not None else "contract"
            print(f"drift reference: {why if reference is not None else f'the contract (no champion data: {why})'}")
        try:
            report = validate(params.data.processed_dir, contract, cfg.report,
                              min_class_fraction=cfg.min_class_fraction, max_class_fraction=cfg.max_class_fraction,
                              allow_missing_classes=params.contract.allow_missing_classes,
                              drift=DriftThresholds(drift.psi_warn, drift.psi_fail, drift.ks_pvalue),
                              drift_report=drift.report, drift_plot=drift.plot, drift_reference=reference,
                              drift_source=source)
        finally:
            for path in (cfg.report, drift.report, drift.plot):
                if Path(path).is_file():
                    tracker.log_artifact(path, "data")
    summary = {"success": report["success"], "report": cfg.report, "contract": contract.reference(),
               "expectations": {name: split["evaluated"] for name, split in report["splits"].items()}}
    warnings = format_failures(report, "warnings")
    if warnings:
        print(f"warning: expectations reported as warnings (contract.allow_missing_classes):\n{warnings}")
    if "drift" in report:
        summary["drift"] = report["drift"]["summary"]
        if report["drift"]["level"] == "warn":
            print(f"warning: {report['drift']['summary']}")
    return summary


validate_task = task(run, name="validate", cache_policy=NO_CACHE)

if __name__ == "__main__":
    stage_main("validate", run)
