"""One model version, downloaded and loaded whole for serving, and served only when its signed
approval verifies (:mod:`registry.signing`): the signature before any download, then the digest of
the very files downloaded and the approver against the run's author, then the production release's
weights digest when the version names one."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from deploy.inputs import InputSpec
from ml.errors import RegistryError
from registry.releases import check_release_weights
from registry.signing import Keyring, directory_digest, verify_tags


class UnverifiedVersion(RegistryError):
    """A version the alias names whose signed approval does not verify; it is not served."""

    def __init__(self, version: str, why: str) -> None:
        super().__init__(why)
        self.version, self.why = version, why



@dataclass(frozen=True)
class ServedModel:
    """One loaded model version and where it came from."""

    name: str
    version: str
    run_id: str | None
    status: str
    dataset_md5: str | None
    dataset_source: str | None
    module: Any
    spec: InputSpec
    since: str = ""
    approval: str = ""  # who signed the approval that let it be served
    labels: tuple[str, ...] | None = None  # class names by output index, from the version's data contract

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class indices and class probabilities for a float32 matrix."""
        from ml.model.predict import predict

        classes, probabilities = predict(self.module, x, probabilities=True)
        return classes, probabilities


def public_uri(uri: str) -> str:
    """``uri`` fit for records, tags and /info: no credentials, a SQLite file by its absolute path."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))


def load_version(client: Any, tracking_uri: str, name: str, version: str,
                 keyring: Keyring | None = None) -> ServedModel:
    """Downloads and loads one model version completely, checked against its signature; raises
    :class:`UnverifiedVersion` unless its signed approval verifies over the files downloaded, and
    :class:`registry.releases.ReleaseMismatch` when the version names a production release whose
    weights digest is not that of the weights loaded."""
    import mlflow.artifacts
    import mlflow.pytorch
    import torch
    from mlflow.models import Model

    from ml.model.predict import inference_model
    from registry.store import get_version, run_author

    record = get_version(client, name, version)
    keyring = keyring or Keyring.load()
    verdict = verify_tags(name, record.version, record.tags, keyring)  # the signature, before any download
    if not verdict.approved:
        raise UnverifiedVersion(record.version, verdict.why or f"its signed status is {verdict.status}")
    with tempfile.TemporaryDirectory(prefix="mlops-serve-") as tmp:
        # the version's own artifact location: a models:/ URI would be resolved against the
        # process-wide registry URI, not this server's
        source = client.get_model_version_download_uri(name, record.version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri)
        verdict = verify_tags(name, record.version, record.tags, keyring,
                              weights_digest=directory_digest(local), author=run_author(client, record.run_id))
        if not verdict.approved:
            raise UnverifiedVersion(record.version, verdict.why or f"its signed status is {verdict.status}")
        spec = InputSpec.from_signature(Model.load(local).signature, f"{name} v{version}")
        module = mlflow.pytorch.load_model(local)
    check_release_weights(name, record.version, record.tags, module.state_dict())  # refuses: ReleaseMismatch
    contract = json.loads(record.tags["input_signature"]) if "input_signature" in record.tags else {}
    inputs = [name for name, _ in contract.get("inputs", [])]
    if spec.columns is None and len(inputs) == spec.width:
        spec = replace(spec, columns=tuple(inputs))
    module = inference_model(module, spec.width)
    with torch.inference_mode():  # the first call pays for lazy initialization, not a request
        out = module(torch.zeros(2, spec.width))
    if out.ndim != 2:
        raise RegistryError(f"{name} v{version}: model output has shape {list(out.shape)}; expected [rows, classes]")
    labels = tuple(contract.get("classes", ()))
    return ServedModel(name, record.version, record.run_id, verdict.status, record.tags.get("dataset_md5"),
                       record.tags.get("dataset_source"), module, spec, approval=verdict.line(),
                       labels=labels if len(labels) == out.shape[1] else None)

