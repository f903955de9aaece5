"""``mlops data-remote pull NAME VERSION``: the exact data (and model outputs) a model version was
trained on, in this checkout, from the DVC remote of the ``data_remote`` settings.

dvc.lock is not committed (README: Configuration), so a fresh clone has nothing to tell ``dvc pull``
what to fetch. The training flow logs the dvc.lock it committed as ``dvc/dvc.lock`` of its pipeline
run; this command follows the version to that run (version -> training run -> its parent pipeline
run), makes that file the checkout's dvc.lock, runs ``dvc pull`` and checks that the dataset's md5
equals the ``dataset_md5`` the version's lineage records.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from ml.errors import PipelineError

PARENT_TAG = "mlflow.parentRunId"


def version_lock(client: Any, name: str, version: str) -> tuple[str, str, dict[str, str]]:
    """The version's ``dataset_md5``, the dvc.lock its pipeline run logged, and that run's tags."""
    from mlflow.exceptions import MlflowException

    from ml.dvc_remote import LOCK_ARTIFACT_DIR
    from registry.store import get_version

    record = get_version(client, name, version)
    md5 = record.tags.get("dataset_md5")
    if not md5 or not record.run_id:
        raise PipelineError(f"model {name!r} version {version}: no dataset_md5 or source run recorded; "
                            "it was not registered by the pipeline")
    pipeline_id = client.get_run(record.run_id).data.tags.get(PARENT_TAG)
    if not pipeline_id:
        raise PipelineError(f"model {name!r} version {version}: its run {record.run_id} has no pipeline run; "
                            "only versions the training flow registered have a logged dvc.lock")
    pipeline = client.get_run(pipeline_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(pipeline_id, f"{LOCK_ARTIFACT_DIR}/dvc.lock", tmp)
        except (MlflowException, OSError):
            raise PipelineError(f"model {name!r} version {version}: pipeline run {pipeline_id} logged no "
                                f"{LOCK_ARTIFACT_DIR}/dvc.lock (the flow ran with --no-version-data, or "
                                "outside the checkout's params.yaml)") from None
        return md5, Path(local).read_text(), dict(pipeline.data.tags)


def cmd_pull(args: argparse.Namespace) -> None:
    from ml.dvc_remote import DataRemoteError, describe, pull_lock
    from mlops.cli import client_for, settings
    from registry.auth import denied_as_error

    remote = settings(args).data_remote
    if remote.url is None:
        raise PipelineError("data_remote.url is not set (settings.yaml or MLOPS_DATA_REMOTE__URL): expected "
                            "the DVC remote the version's pipeline pushed to")
    with denied_as_error(f"data-remote pull {args.name} {args.version}"):
        md5, lock, tags = version_lock(client_for(args), args.name, args.version)
    try:
        path, stats = pull_lock(remote, lock, md5, force=args.force)
    except DataRemoteError as exc:
        pushed = tags.get("data_pushed")
        why = ("" if pushed == "true" else "; its pipeline run did not push its data" if pushed == "false"
               else "; its pipeline run had no data remote set")
        if tags.get("data_remote") and tags["data_remote"] != remote.url:
            why += f"; it pushed to {tags['data_remote']}"
        raise DataRemoteError(f"{exc}{why}") from None
    print(f"{path}: {md5} ({args.name} version {args.version}), {stats['fetched']} files fetched from {describe(remote)}; "
          "dvc.lock is the version's")


def add_parser(subparsers: Any) -> None:
    group = subparsers.add_parser("data-remote", help="the DVC remote of the data_remote settings",
                                  description=__doc__.splitlines()[0])
    actions = group.add_subparsers(dest="action", required=True)
    pull = actions.add_parser("pull", help="dvc pull the data and model outputs a model version was trained on")
    pull.add_argument("name", help="registered model name")
    pull.add_argument("version")
    pull.add_argument("--force", action="store_true",
                      help="replace this checkout's dvc.lock and the workspace outputs that differ")
    pull.set_defaults(func=cmd_pull)
