"""The training pipeline as one Prefect flow: the same stage functions dvc.yaml runs, in the same
order, then ``dvc commit`` so dvc.lock versions exactly what the flow produced.

    python -m flows.training [--params params.yaml]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from ml.errors import cli_errors
from tasks.evaluate import evaluate_task
from tasks.prepare import prepare_task
from tasks.register import register_task
from tasks.train import train_task
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


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(params_path: str = "params.yaml", version_data: bool = True) -> dict[str, Any]:
    """prepare -> validate -> train -> evaluate -> register; returns the registered version.

    ``version_data`` commits the outputs to DVC when ``params_path`` is the repository's params.yaml
    (dvc.yaml reads that file, so a different one would record params it did not use).
    """
    prepare_task(params_path)
    validate_task(params_path)
    train_task(params_path)
    evaluate_task(params_path)
    registered = register_task(params_path)
    if version_data and Path(params_path).resolve() == Path("params.yaml").resolve() and Path("dvc.yaml").exists():
        version_outputs_task()
    return registered


def next_steps(registered: dict[str, Any]) -> str:
    name, version = registered["model_name"], registered["version"]
    return "\n".join([
        f"Registered {name} version {version}: {registered['status']}",
        f"  test accuracy {registered['test_accuracy']:.4f}, dataset {registered['dataset_md5']}",
        "Next:",
        "  make ui                                   # MLflow UI on http://127.0.0.1:5000 (and Prefect)",
        f"  .venv/bin/mlops models show {name} {version}",
        f"  .venv/bin/mlops models approve {name} {version} --reason '...'   (another user, or --allow-self-approval)",
        f"  .venv/bin/mlops models promote {name} {version}",
    ])


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.training", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-version-data", action="store_true", help="do not commit outputs to DVC")
    args = parser.parse_args(argv)
    registered = training_pipeline(args.params, version_data=not args.no_version_data)
    print(next_steps(registered))


if __name__ == "__main__":
    main()
