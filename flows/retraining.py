"""Retraining that decides for itself: refresh the source, prepare, then

- nothing new (the dataset md5, code commit and params equal a registered version's lineage: the
  champion's or the newest version's): the run ends ``Skipped`` with the reason, nothing registered;
- otherwise validate (the data contract's gate and drift), train, evaluate, score challenger and
  champion on the new test split and on the champion's own (from the DVC cache), and register the
  challenger pending approval when it passes the registration gate (tasks/register.py);
- a gate failure, drift beyond ``drift.psi_fail`` or an unreachable/unreadable source: ``Failed``
  with the reason, nothing registered.

Every run ends with a Markdown artifact (key ``retraining-summary``) and the same summary on its
MLflow pipeline run. It emits the Prefect events ``mlops.data.new`` (a dataset version no
registered version was trained on) and ``mlops.drift.detected`` (drift at warn or fail), whose
resource is ``mlops.dataset.<md5>``.

    python -m flows.retraining [--params params.yaml] [--source URI] [--no-version-data]

The deployment ``training-pipeline/nightly-retrain`` (deploy/prefect.yaml) runs this flow, in a
workspace of its own like the training pipeline's deployment runs (flows/workspace.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from flows.promotion import start_promotion
from flows.training import (check_data_remote, quiet_flow_console, quiet_known_errors, start_pipeline_run,
                            version_outputs, versions_data)
from flows.workspace import in_workspace
from ml.errors import QualityGateFailed, cli_errors
from tasks.evaluate import evaluate_task
from tasks.prepare import prepare_task
from tasks.register import register_task
from tasks.retrain import (SKIP, Decision, baselines, compare_on_splits, compared_params, dataset_diff,
                           decide, materialize_dvc_dir, summary_markdown)
from tasks.train import FLAGS as TRAIN_FLAGS, train_task
from tasks.validate import validate_task

SOURCES_DIR = "data/sources"  # local copies of S3 sources, which prepare reads
ARTIFACT_KEY = "retraining-summary"
DATA_NEW_EVENT = "mlops.data.new"
DRIFT_EVENT = "mlops.drift.detected"


def fetch(uri: str) -> Any:
    from ml.data.source import fetch_source

    return fetch_source(uri, SOURCES_DIR)


fetch_task = task(fetch, name="refresh-source", cache_policy=NO_CACHE)


def params_for_source(params_path: str, local_source: str, directory: Path) -> str:
    """``params_path`` itself when its ``data.source`` is ``local_source``, else a copy with that
    source in ``directory`` (the stages read the file they are given)."""
    raw = yaml.safe_load(Path(params_path).read_text())
    if raw.get("data", {}).get("source") == local_source:
        return params_path
    raw["data"]["source"] = local_source
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def emit(event: str, md5: str, source: str, payload: dict[str, Any]) -> None:
    from prefect.events import emit_event

    emit_event(event=event, resource={"prefect.resource.id": f"mlops.dataset.{md5}", "mlops.source": source},
               payload=payload)


def drift_level(report_path: str) -> dict[str, Any] | None:
    path = Path(report_path)
    return json.loads(path.read_text()) if path.is_file() else None


def decide_on_inputs(params: Any, params_path: str) -> tuple[Decision, str, str]:
    """The decision over the prepared data, with its md5 and the code commit."""
    from ml.config import flatten, load_params
    from ml.provenance import dir_md5, git_info
    from ml.settings import load_settings
    from ml.tracking.mlflow_tracker import configure_mlflow

    md5, commit = dir_md5(params.data.processed_dir), git_info().commit
    flat = {k: v for section in ("data", "validate", "train", "evaluate", "register", "anomaly")
            for k, v in flatten(getattr(load_params(params_path), section), f"{section}.").items()}
    client = configure_mlflow(load_settings().tracking)
    decision = decide(params.register.model_name, md5, commit, compared_params(flat),
                      baselines(client, params.register.model_name))
    return decision, md5, commit


def finish(pipeline: Any, summary: dict[str, Any], status: str) -> None:
    """The summary on the pipeline run (tags, metrics, Markdown and JSON) and as the flow run's artifact."""
    markdown = summary_markdown(summary)
    try:
        pipeline.set_tags({"retrain_decision": summary["decision"], "retrain_reason": summary["reason"][:5000]})
        pipeline.log_text(markdown, "retraining/summary.md")
        pipeline.log_text(json.dumps(summary, indent=2, default=str), "retraining/summary.json")
        try:
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(markdown, key=ARTIFACT_KEY, description=f"retraining: {summary['decision']}")
        except Exception as exc:  # noqa: BLE001 - outside a flow run there is nothing to attach it to
            print(f"(no Prefect artifact: {exc.__class__.__name__})")
    finally:
        pipeline.close(status)


@flow(name="training-pipeline", log_prints=True)
@in_workspace
def retraining_pipeline(params_path: str = "params.yaml", source: str | None = None,
                        version_data: bool = True, retune: bool = False) -> Any:
    """Refresh, decide, then skip or retrain (see the module docstring). Returns the summary; a
    skip is a ``Completed`` state named ``Skipped``, a refused registration one named ``NotRegistered``.
    ``retune``: the train stage measures ``train.optimize: auto``'s setups again."""
    from ml.config import load_params
    from ml.settings import load_settings
    from ml.tracking.mlflow_tracker import configure_mlflow

    quiet_known_errors()
    params = load_params(params_path)
    uri = source or params.data.source
    own_source = source is None or source == params.data.source
    versioning = own_source and versions_data(params_path, version_data)
    remote = check_data_remote(versioning)
    pipeline = start_pipeline_run(params_path)
    pipeline.set_tags({"retrain_source": uri, "mlops.retraining": "true"})
    summary: dict[str, Any] = {"decision": "failed", "reason": "", "source": uri}
    status, state = "FAILED", None
    workdir = Path(tempfile.mkdtemp(prefix="mlops-retrain-"))
    try:
        fetched = fetch_task(uri)
        run_params = params_for_source(params_path, fetched.local, workdir)
        prepare_task(run_params, parent_run_id=pipeline.run_id)
        decision, md5, commit = decide_on_inputs(params, run_params)
        summary.update(reason=decision.reason, dataset_md5=md5, git_commit=commit)
        pipeline.set_tags({"dataset_md5": md5, "dataset_source": uri})
        print(f"retraining: {decision.reason}")
        if decision.action == SKIP:
            summary["decision"], status = "skipped", "FINISHED"
            state = Completed(name="Skipped", message=decision.reason, data=summary)
            return state
        if decision.new_data:
            emit(DATA_NEW_EVENT, md5, uri, {"previous": decision.baseline.dataset_md5 if decision.baseline else None,
                                             "reason": decision.reason})
        summary["decision"] = "retrained"
        champion_dir = workdir / "champion"
        baseline = decision.baseline
        champion_md5 = baseline.dataset_md5 if baseline and baseline.role == "champion" else None
        has_champion_data = bool(champion_md5) and champion_md5 != md5 and materialize_dvc_dir(champion_md5, champion_dir)
        try:
            validate_task(run_params, parent_run_id=pipeline.run_id)
        finally:
            summary["dataset_diff"] = dataset_diff(params.data.processed_dir, params.drift.report,
                                                   champion_dir if has_champion_data else None)
            drift = summary["dataset_diff"].get("drift")
            if drift and drift["level"] != "ok":
                emit(DRIFT_EVENT, md5, uri, drift)
        trained = train_task(run_params, parent_run_id=pipeline.run_id, retune=retune)
        pipeline.set_tags({"train_run_id": trained["run_id"]})
        evaluate_task(run_params, parent_run_id=pipeline.run_id)
        client = configure_mlflow(load_settings().tracking)
        comparison = compare_on_splits(client, params.register.model_name, trained["model_uri"],
                                       params.data.processed_dir, md5)
        summary["comparison"] = comparison.to_dict()
        pipeline.log_metrics(comparison.metrics(), step=0)
        try:
            registered = register_task(run_params, parent_run_id=pipeline.run_id)
        except QualityGateFailed as exc:
            summary.update(decision="not registered", reason=f"{decision.reason}; {exc}")
            status = "FINISHED"
            state = Completed(name="NotRegistered", message=str(exc), data=summary)
            return state
        for key, value in comparison.version_tags().items():
            client.set_model_version_tag(registered["model_name"], registered["version"], key, value)
        summary["registered"] = {k: registered[k] for k in ("model_name", "version", "status")}
        pipeline.set_tags({"registered_model": registered["model_name"], "registered_version": registered["version"]})
        if versioning:
            version_outputs(pipeline, registered, remote)
        elif not own_source:
            print(f"--source {uri} is not params.yaml's data.source: outputs not committed to DVC")
        status = "FINISHED"
        start_promotion(registered["model_name"], registered["version"])
        return summary
    except Exception as exc:
        changes = f" (retraining because: {summary['reason']})" if summary["reason"] else ""
        summary.update(decision="failed", error=str(exc), reason=str(exc).splitlines()[0] + changes)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        finish(pipeline, summary, status)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.retraining", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--source", default=None,
                        help="sklearn:<name>, a .csv/.parquet path or s3://bucket/key (default: params' data.source)")
    parser.add_argument("--no-version-data", action="store_true", help="do not commit outputs to DVC")
    parser.add_argument("--retune", action="store_true", help=TRAIN_FLAGS["--retune"])
    args = parser.parse_args(argv)
    from ml.config import load_params

    params = load_params(args.params)
    own = args.source is None or args.source == params.data.source
    check_data_remote(own and versions_data(args.params, not args.no_version_data))
    quiet_flow_console()
    state = retraining_pipeline(args.params, args.source, version_data=not args.no_version_data, retune=args.retune,
                                return_state=True)
    summary = state.result()
    print(f"{state.name}: {summary['reason']}")
    registered = summary.get("registered")
    if registered:
        name, version = registered["model_name"], registered["version"]
        print(f"Registered {name} version {version}: {registered['status']}\nNext:\n"
              f"  .venv/bin/mlops models list {name}\n"
              f"  .venv/bin/mlops models approve {name} {version} --reason '...'\n"
              f"  .venv/bin/mlops models reject {name} {version} --reason '...'")


if __name__ == "__main__":
    main()
