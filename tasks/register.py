"""register: a new model version, PendingManualApproval, with its lineage. It never moves an alias.

Two gates decide whether a trained model is registered at all:

1. absolute: test accuracy >= ``register.min_test_accuracy``;
2. champion/challenger: when a champion exists, its input signature (feature names, order,
   dtypes) and class list must equal the challenger's (``register.allow_breaking_change`` registers
   a deliberate change, recorded on the version and in its approval history); then it is scored on
   the same test split (``data.processed_dir``, labels mapped through the data contract's class
   list) and the challenger's accuracy minus the champion's must reach ``register.champion_min_delta``.

Every version carries the data contract it was trained under (path, digest, the file as an
artifact of its run) and its input signature.

A model that fails either gate is not registered: the registry holds only candidates worth a
person's review, so a list of pending versions is a list of real decisions. The evidence is not
lost: the verdict, the reason and the champion's numbers are set as tags on the source run, where
the MLflow UI shows them beside the run's metrics. A model that passes carries the same comparison
as tags on its version and in ``register.output``, so the approver sees it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ml.config import load_params
from ml.settings import load_settings
from ml.errors import QualityGateFailed
from ml.io import atomic_write_json, read_json
from ml.tracking.mlflow_tracker import configure_mlflow
from ml.data.contract import ContractError, digest_of
from registry.approval import PENDING, meets_quality_gate
from registry.challenger import INCOMPARABLE, SIGNATURE_TAG, compare_with_champion
from registry.store import HISTORY_TAG, register_version
from tasks.entry import should_retry, stage_main, stage_run

REFUSED_TAG = "register_refused"
REGISTERED_TAG = "registered_version"


def tag_run(client: Any, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def refuse(client: Any, run_id: str, why: str, tags: dict[str, str]) -> QualityGateFailed:
    """Records on the source run why its model was not registered; returns the error to raise."""
    tag_run(client, run_id, {**tags, REFUSED_TAG: why[:5000]})
    return QualityGateFailed(f"not registered: {why}")


def prepared_contract(processed_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The contract the prepared data was checked against (path, digest, name, version) and the
    input signature it gives models; the file must still be the one prepare read."""
    schema = read_json(Path(processed_dir) / "schema.json")
    contract, signature = schema.get("contract"), schema.get("signature")
    if not contract or not signature:
        raise ContractError(f"{processed_dir}/schema.json names no data contract; run the prepare stage again")
    path = Path(contract["path"])
    if not path.is_file() or digest_of(path) != contract["digest"]:
        raise ContractError(f"data contract {path} changed since prepare read it; run the prepare stage again")
    return contract, signature


def breaking_change_event(reason: str) -> dict[str, Any]:
    """The first entry of a version's approval history when it was registered as a deliberate
    schema change, so an approver reads it beside every decision."""
    import getpass

    return {"from_status": "(registered)", "to_status": PENDING, "by": getpass.getuser(),
            "at": datetime.now(UTC).isoformat(timespec="seconds"), "via": "register", "self_approval": False,
            "breaking_change": True, "reason": f"registered with register.allow_breaking_change: {reason}"}


def run(params_path: str = "params.yaml", parent_run_id: str | None = None) -> dict[str, Any]:
    params, tracking = load_params(params_path), load_settings().tracking
    trained = read_json(params.train.run_file)
    with stage_run("register", tracking=tracking, parent=parent_run_id,
                   tags={"source_run_id": trained["run_id"]}) as tracker:
        summary = _register(params, trained, tracking)
        tracker.set_tags({"registered_model": summary["model_name"], "registered_version": summary["version"]})
    return summary


def _register(params: Any, trained: dict[str, Any], tracking: Any) -> dict[str, Any]:
    cfg = params.register
    metrics = read_json(params.evaluate.metrics_file)
    run_id = trained["run_id"]
    client = configure_mlflow(tracking)
    passed, why = meets_quality_gate(metrics, cfg.min_test_accuracy)
    if not passed:
        raise refuse(client, run_id, why, {"quality_gate": f"failed: {why}"})
    contract, signature = prepared_contract(params.data.processed_dir)
    try:
        comparison = compare_with_champion(client, cfg.model_name, metrics["accuracy"], params.data.processed_dir,
                                           cfg.champion_min_delta, signature=signature,
                                           allow_breaking_change=cfg.allow_breaking_change)
    except ContractError as exc:
        tag_run(client, run_id, {"quality_gate": f"passed: {why}", REFUSED_TAG: str(exc)[:5000]})
        raise
    breaking = comparison.reason if comparison.verdict == INCOMPARABLE else None
    contract_tags = {"contract_path": contract["path"], "contract_digest": contract["digest"],
                     "contract_version": str(contract["version"]),
                     "contract_artifact": f"runs:/{run_id}/contract/{Path(contract['path']).name}",
                     SIGNATURE_TAG: json.dumps(signature, separators=(",", ":")),
                     **({"breaking_change": breaking[:5000]} if breaking else {})}
    client.log_artifact(run_id, contract["path"], "contract")
    if not comparison.passed:
        raise refuse(client, run_id, comparison.reason, {"quality_gate": f"passed: {why}", **comparison.tags()})
    dataset = trained["dataset"]
    record = register_version(client, cfg.model_name, trained["model_uri"], run_id, tags={
        "source_run_id": run_id, "dataset_md5": dataset["md5"], "dataset_source": dataset["source"],
        "dataset_path": dataset["path"], "git_commit": trained["git"]["commit"],
        "test_accuracy": f"{metrics['accuracy']:.6f}", "quality_gate": why, **comparison.tags(), **contract_tags})
    if breaking:
        client.set_model_version_tag(record.name, record.version, HISTORY_TAG,
                                     json.dumps([breaking_change_event(breaking)]))
    tag_run(client, run_id, {"quality_gate": f"passed: {why}", **comparison.tags(),
                             REGISTERED_TAG: f"{record.name}/{record.version}"})
    if REFUSED_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, REFUSED_TAG)
    summary = {"model_name": record.name, "version": record.version, "status": record.status,
               "run_id": record.run_id, "test_accuracy": metrics["accuracy"], "dataset_md5": dataset["md5"],
               "champion_gate": comparison.to_dict(), "contract": contract,
               **({"breaking_change": breaking} if breaking else {})}
    atomic_write_json(cfg.output, summary)
    return summary


register_task = task(run, name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
                     retry_condition_fn=should_retry)

if __name__ == "__main__":
    stage_main("register", run)
