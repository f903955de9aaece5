"""Builds a serving test project in the current directory (which holds a small params.yaml).

``python -m tests.integration.serving_setup`` runs the prepare, train, evaluate and register stage
functions twice (the second time with another seed), approves both versions, promotes the first to
``champion`` and prints ``{"tracking_uri", "model_name", "versions", "test_accuracy"}`` as JSON.
It runs in its own process so the stages' process-wide MLflow settings stay out of the test session.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def set_seed(params_path: Path, seed: int) -> None:
    params = yaml.safe_load(params_path.read_text())
    params["train"]["seed"] = seed
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    from mlflow import MlflowClient

    from ml.config import load_params
    from registry import store
    from tasks import evaluate, prepare, register, train

    params_path = Path("params.yaml")
    params = load_params(params_path)
    prepare.run(str(params_path))
    versions, accuracy = [], {}
    for seed in (params.train.seed, params.train.seed + 1):
        set_seed(params_path, seed)
        train.run(str(params_path))
        evaluate.run(str(params_path))
        summary = register.run(str(params_path))
        versions.append(summary["version"])
        accuracy[summary["version"]] = summary["test_accuracy"]
    set_seed(params_path, params.train.seed)
    uri, name = params.tracking.uri, params.register.model_name
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for version in versions:
        store.decide(client, name, version, "Approved", "tester", "serving test", allow_self_approval=True)
    store.promote(client, name, versions[0], "tester")
    print(json.dumps({"tracking_uri": uri, "model_name": name, "versions": versions, "test_accuracy": accuracy}))


if __name__ == "__main__":
    main()
