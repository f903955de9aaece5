"""The training pipeline as one Prefect flow: the same stage functions dvc.yaml runs, in the same
order, then ``dvc commit`` so dvc.lock versions exactly what the flow produced, and ``dvc push`` to
the DVC remote of the ``data_remote`` settings when one is set (README: Data on a DVC remote).

    python -m flows.training [--params params.yaml]
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.promotion import start_promotion
from flows.workspace import in_workspace, workspace_tags
from ml.errors import PipelineError, cli_errors
from tasks.entry import should_retry
from tasks.evaluate import evaluate_task
from tasks.prepare import prepare_task
from tasks.register import register_task
from tasks.train import FLAGS as TRAIN_FLAGS, train_task
from tasks.validate import validate_task

STAGES = ("prepare", "validate", "train", "evaluate", "register")


def commit_outputs(repo_dir: str = ".") -> list[str]:
    """Records the stages' current deps, params and outs in dvc.lock and the DVC cache."""
    from dvc.repo import Repo

    with Repo(repo_dir) as repo:
        for stage in STAGES:
            repo.commit(stage, force=True)
    return list(STAGES)


version_outputs_task = task(commit_outputs, name="dvc-commit", cache_policy=NO_CACHE)


def push_outputs(remote: Any, repo_dir: str = ".") -> int:
    """``dvc push`` of what dvc.lock records to ``remote`` (the ``data_remote`` settings)."""
    from ml.dvc_remote import push

    return push(remote, repo_dir)


push_outputs_task = task(push_outputs, name="dvc-push", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
                         retry_condition_fn=should_retry)


def versions_data(params_path: str, version_data: bool) -> bool:
    """Whether the flow commits its outputs to DVC: ``version_data`` and the repository's own
    params.yaml (dvc.yaml reads that file, so a different one would record params it did not use)."""
    return version_data and Path(params_path).resolve() == Path("params.yaml").resolve() and Path("dvc.yaml").exists()


def check_data_remote(versioning: bool) -> Any:
    """The ``data_remote`` settings when the flow will push to them, checked before any work starts
    (one line naming the bucket or directory); None when there is nothing to push to."""
    from ml.dvc_remote import check_remote
    from ml.settings import load_settings

    remote = load_settings().data_remote
    if not versioning or remote.url is None:
        return None
    check_remote(remote)
    return remote


def version_outputs(pipeline: Any, registered: dict[str, Any], remote: Any) -> None:
    """``dvc commit``, the resulting dvc.lock as an artifact of the pipeline run, then ``dvc push``
    when a remote is set. A push that fails after its retries fails the flow (exit 5) with one line
    saying that the version is registered but its data is only in this checkout's DVC cache: the
    registration is not undone, since the push can be repeated (`dvc push`) and the version's
    approval does not depend on it, but a run that cannot be reproduced elsewhere is not a success."""
    from ml.dvc_remote import LOCK_ARTIFACT_DIR, DataNotPushed, DataRemoteError, describe
    from tasks.entry import console_to_run

    with console_to_run(pipeline, "dvc-commit"):  # DVC's notices (each lock file line twice) go there
        version_outputs_task()
    pipeline.log_artifact("dvc.lock", LOCK_ARTIFACT_DIR)
    if remote is None:
        return
    pipeline.set_tags({"data_remote": remote.url})
    try:
        with console_to_run(pipeline, "dvc-push"):
            pushed = push_outputs_task(remote)
    except DataRemoteError as exc:
        pipeline.set_tags({"data_pushed": "false"})
        raise DataNotPushed(f"{registered['model_name']} version {registered['version']} is registered, but its "
                            f"data and model were not pushed to {describe(remote)}: {exc}; they are in this "
                            "checkout's DVC cache: run `dvc push` once the remote takes them") from None
    pipeline.set_tags({"data_pushed": "true"})
    print(f"dvc push: {pushed} files uploaded to {describe(remote)}")


def start_pipeline_run(params_path: str) -> Any:
    """The parent MLflow run of one pipeline execution: all params, the code version, the flow run.
    The flow run gets a link artifact to it, so the Prefect and MLflow UIs point at each other."""
    from ml.config import flatten, load_params
    from ml.provenance import git_info
    from ml.settings import load_settings
    from ml.tracking.mlflow_tracker import MlflowTracker
    from tasks.entry import flow_run_tags

    params, settings = load_params(params_path), load_settings()
    git = git_info()
    tracker = MlflowTracker.start(settings.tracking, "pipeline", kind="pipeline", system_metrics=False, tags={
        "git_commit": git.commit, "git_branch": git.branch, "git_dirty": git.dirty, **flow_run_tags(),
        **workspace_tags()})
    tracker.log_params({**{k: v for section in ("data", "validate", "train", "evaluate", "register", "anomaly")
                           for k, v in flatten(getattr(params, section), f"{section}.").items()},
                        **flatten(settings.tracking, "settings.tracking."),
                        **flatten(settings.checkpoint, "settings.checkpoint.")})
    try:
        from prefect.artifacts import create_link_artifact

        create_link_artifact(tracker.url, link_text="MLflow pipeline run", key="mlflow-pipeline-run",
                             description=f"MLflow run {tracker.run_id} (experiment {settings.tracking.experiment})")
    except Exception as exc:  # noqa: BLE001 - outside a flow run there is nothing to attach the link to
        print(f"MLflow run {tracker.url} (no Prefect link: {exc.__class__.__name__})")
    return tracker


class KnownErrorFormatter(logging.Formatter):
    """Formats a record as ``inner`` does, leaving out the traceback of a :class:`PipelineError`: a
    user's input, said in one line. Prefect's API handler (the run's log in the UI) and the stage's
    console artifact keep the traceback."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info and isinstance(record.exc_info[1], PipelineError)):
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


class _Notice(logging.Filter):
    """Drops records below WARNING logged on the logger it is added to itself (not its children)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


# Notices printed before and after a flow run, where no console log exists: Prefect's temporary API
# server starting and stopping (it serves no UI) and MLflow creating its database's tables.
_NOTICE_LOGGERS = ("prefect", "mlflow.store.db.utils")
_NOTICE = _Notice()


def quiet_flow_console() -> None:
    """What ``python -m flows.<flow>`` does before its flow starts, so the terminal shows the stages,
    the progress bar and the result: the temporary Prefect server sends no telemetry (its notice,
    and offline an error line, would reach the terminal; ``mlops up`` starts its server the same way),
    and the notices of :data:`_NOTICE_LOGGERS` are left out. Inside the flow, other libraries'
    output goes to the console logs of the runs (:func:`tasks.entry.console_to_run`)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for name in _NOTICE_LOGGERS:
        logging.getLogger(name).addFilter(_NOTICE)


def quiet_known_errors() -> None:
    """Console handlers of this process stop printing tracebacks for errors a user caused."""
    from prefect.logging.handlers import APILogHandler

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                                      if n.startswith("prefect"))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, APILogHandler) \
                    and not isinstance(handler.formatter, KnownErrorFormatter):
                handler.setFormatter(KnownErrorFormatter(handler.formatter))


@flow(name="training-pipeline", log_prints=True)
@in_workspace
def training_pipeline(params_path: str = "params.yaml", version_data: bool = True,
                      retune: bool = False) -> dict[str, Any]:
    """prepare -> validate -> train -> evaluate -> register, each a nested MLflow run under one
    pipeline run; returns the registered version. ``retune``: under ``train.optimize: auto``, the
    train stage measures the candidate setups again instead of reusing its cached choice.

    ``version_data`` commits the outputs to DVC when ``params_path`` is the repository's params.yaml
    (dvc.yaml reads that file, so a different one would record params it did not use).
    """
    quiet_known_errors()
    versioning = versions_data(params_path, version_data)
    remote = check_data_remote(versioning)
    pipeline = start_pipeline_run(params_path)
    parent = pipeline.run_id
    status = "FAILED"
    try:
        prepare_task(params_path, parent_run_id=parent)
        validate_task(params_path, parent_run_id=parent)
        trained = train_task(params_path, parent_run_id=parent, retune=retune)
        pipeline.set_tags({"train_run_id": trained["run_id"], "dataset_md5": trained["dataset"]["md5"],
                           "dataset_source": trained["dataset"]["source"]})
        evaluate_task(params_path, parent_run_id=parent)
        registered = register_task(params_path, parent_run_id=parent)
        pipeline.set_tags({"registered_model": registered["model_name"],
                           "registered_version": registered["version"]})
        if versioning:
            version_outputs(pipeline, registered, remote)
        status = "FINISHED"
        # With promotion.after_training, hand the new version to the promotion flow (it waits for
        # the approval in the registry); otherwise this does nothing.
        start_promotion(registered["model_name"], registered["version"])
    finally:
        pipeline.close(status)
    return {**registered, "pipeline_run_id": parent, "pipeline_run_url": pipeline.url}


def next_steps(registered: dict[str, Any], local_store: bool = True) -> str:
    """The result and the commands that follow it. With a tracking server (not ``local_store``)
    the pipeline run's page there replaces ``make ui``, which serves the local store."""
    name, version = registered["model_name"], registered["version"]
    url = registered.get("pipeline_run_url")
    ui = ("  make ui                                   # MLflow UI on http://127.0.0.1:5000 (and Prefect)"
          if local_store or not url else f"  {url}   # the pipeline run on the tracking server")
    return "\n".join([
        f"Registered {name} version {version}: {registered['status']}",
        f"  test accuracy {registered['test_accuracy']:.4f}, dataset {registered['dataset_md5']}",
        "Next:",
        ui,
        f"  .venv/bin/mlops models show {name} {version}",
        f"  .venv/bin/mlops models approve {name} {version} --reason '...'   (another user, or --allow-self-approval)",
        f"  .venv/bin/mlops models promote {name} {version}",
        f"  .venv/bin/mlops lineage model {name} {version}   # version -> run -> dataset",
        "  .venv/bin/mlops serve                     # serves the champion, follows promotions",
        "  .venv/bin/mlops lineage endpoint digits   # once serving: endpoint -> version -> run -> dataset",
    ])


def uses_local_store() -> bool:
    """Whether ``tracking.uri`` is a store on this machine (SQLite or a directory), not a server."""
    from ml.settings import load_settings
    from ml.tracking.mlflow_tracker import is_local_store

    return is_local_store(load_settings().tracking.uri)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.training", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-version-data", action="store_true", help="do not commit outputs to DVC")
    parser.add_argument("--retune", action="store_true", help=TRAIN_FLAGS["--retune"])
    args = parser.parse_args(argv)
    # the flow checks the remote too (deployments start there); here it is refused before Prefect starts
    check_data_remote(versions_data(args.params, not args.no_version_data))
    quiet_flow_console()
    registered = training_pipeline(args.params, version_data=not args.no_version_data, retune=args.retune)
    print(next_steps(registered, uses_local_store()))


if __name__ == "__main__":
    main()
