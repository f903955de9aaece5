"""Production releases tied to the registry: promoting a version to ``champion`` publishes its weights
in the production checkpoint tier under the next semantic version, and the version records it.

A release is ``<checkpoint.dir>/production/<X.Y.Z>/`` (mirrored to S3 when the checkpoint mirror is
set), written by :meth:`ml.checkpoint.manager.CheckpointManager.save_production_checkpoint`:
``model.safetensors`` (the weights of the version's PyTorch model, as downloaded from the registry
and checked against its signed approval before they are loaded), ``config.json`` and
``model_card.json`` (description, intended use, dataset version, metrics, limitations, the
registry version and its approval).

Numbering: the first release of a model is 1.0.0; each later one bumps the minor version of the
model's highest release, or the major version when the version was registered with
``register.allow_breaking_change`` (the ``breaking_change`` tag the register stage sets). A version
keeps its release: promoting it again (a rollback, a re-promotion) publishes nothing, names the
release that is live again and moves the production tier's ``latest`` back to it. A release
version that already exists in the production tier is never overwritten.

The version carries, as tags:

- ``release_version``: the semantic version;
- ``release_sha256``: SHA-256 of the release's ``model.safetensors`` file (as its manifest lists it);
- ``release_weights_sha256``: SHA-256 of the tensors themselves (:func:`weights_sha256`: name,
  dtype, shape and bytes, sorted by name), which does not depend on how a file lays them out, so
  ``mlops serve`` recomputes it from the model it loads and refuses weights that are not the
  release's;
- ``release_location``: the release directory, and its S3 URL when mirrored.

These tags are not signed: what authorizes serving is the signed approval (:mod:`registry.signing`).
The release check adds that the weights served are the ones published under that release.

A version whose artifacts are not an MLflow PyTorch model (no ``pytorch`` flavor in ``MLmodel``)
has no weights this tier can hold: it is promoted without a release, and the promotion says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.errors import RegistryError
from registry.approval import CHAMPION
from registry.signing import Keyring, directory_digest, verify_tags

logger = logging.getLogger(__name__)

RELEASE_VERSION_TAG = "release_version"
RELEASE_SHA256_TAG = "release_sha256"
RELEASE_WEIGHTS_TAG = "release_weights_sha256"
RELEASE_LOCATION_TAG = "release_location"
BREAKING_CHANGE_TAG = "breaking_change"  # set by the register stage (register.allow_breaking_change)
FIRST_RELEASE = "1.0.0"
WEIGHTS_FILE = "model.safetensors"


class ReleaseExists(RegistryError):
    """The release version a promotion would publish is already in the production tier."""


class ReleaseMismatch(RegistryError):
    """Weights that are not those of the release their version names."""


@dataclass(frozen=True)
class Release:
    """The production release of one registry version. ``published``: written by this promotion
    (False: the version's earlier release, live again)."""

    version: str
    model: str
    model_version: str
    sha256: str
    weights_sha256: str
    location: str
    published: bool = False

    def line(self) -> str:
        state = "published" if self.published else "live again"
        return f"release {self.version} ({state}) at {self.location}, model.safetensors sha256 {self.sha256}"

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "model": self.model, "model_version": self.model_version,
                "sha256": self.sha256, "weights_sha256": self.weights_sha256, "location": self.location,
                "published": self.published}


# -- pure decisions ------------------------------------------------------------------------------------

def _semver_core(version: str) -> tuple[int, int, int]:
    from ml.checkpoint.policy import is_semver

    if not is_semver(version):
        raise RegistryError(f"release version {version!r}: expected a semantic version such as 1.2.0")
    major, minor, patch = version.split("+")[0].split("-")[0].split(".")
    return int(major), int(minor), int(patch)


def next_release_version(existing: Iterable[str], breaking: bool) -> str:
    """The version the next release of a model takes, given the model's existing releases: 1.0.0
    first; then the highest one's next minor (``X.Y+1.0``), or next major (``X+1.0.0``) when
    ``breaking``."""
    cores = [_semver_core(v) for v in existing]
    if not cores:
        return FIRST_RELEASE
    major, minor, _ = max(cores)
    return f"{major + 1}.0.0" if breaking else f"{major}.{minor + 1}.0"


def weights_sha256(weights: Mapping[str, Any]) -> str:
    """SHA-256 over a state dict's tensors sorted by name: for each, its name, dtype and shape on
    one line, then its bytes (C order). Independent of the file format, device and storage sharing."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu()
        digest.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\n".encode())
        if tensor.numel():
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy of the bytes
    return digest.hexdigest()


def release_of(model: str, version: str, tags: Mapping[str, str]) -> Release | None:
    """The release a version's tags name, or None."""
    if RELEASE_VERSION_TAG not in tags:
        return None
    return Release(tags[RELEASE_VERSION_TAG], model, str(version), tags.get(RELEASE_SHA256_TAG, ""),
                   tags.get(RELEASE_WEIGHTS_TAG, ""), tags.get(RELEASE_LOCATION_TAG, ""))


def check_release_weights(model: str, version: str, tags: Mapping[str, str], weights: Mapping[str, Any]) -> None:
    """Raises :class:`ReleaseMismatch` when the version names a release whose weights digest is not
    that of ``weights``; a version without a release passes."""
    release = release_of(model, version, tags)
    if release is None:
        return
    actual = weights_sha256(weights)
    if actual != release.weights_sha256:
        raise ReleaseMismatch(f"{model} v{version}: its weights are not those of release {release.version} "
                              f"(weights sha256 {actual[:16]}..., {RELEASE_WEIGHTS_TAG} "
                              f"{release.weights_sha256[:16] or 'missing'}...)")


# -- the registry side ---------------------------------------------------------------------------------

def model_releases(client: Any, name: str) -> list[str]:
    """The release versions recorded on any version of ``name``."""
    from registry.store import list_versions

    return [r.tags[RELEASE_VERSION_TAG] for r in list_versions(client, name) if RELEASE_VERSION_TAG in r.tags]


def _card_texts(record: Any, run: Any, alias: str) -> tuple[str, str, str]:
    """Description, intended use and limitations from what the registry records of the version."""
    tags = record.tags
    signature = json.loads(tags["input_signature"]) if "input_signature" in tags else {}
    inputs, classes = signature.get("inputs", []), signature.get("classes", [])
    shape = (f" over {len(inputs)} features to {len(classes)} classes ({', '.join(map(str, classes))})"
             if inputs and classes else "")
    description = (f"{record.name} v{record.version}: PyTorch classifier{shape}, trained by run {record.run_id} "
                   f"at commit {tags.get('git_commit', 'not recorded')}")
    contract = (f"data contract {tags['contract_path']} v{tags.get('contract_version', '?')}"
                if "contract_path" in tags else "the input signature of the model")
    intended_use = (f"served as {record.name}@{alias} by `mlops serve`, for inputs that satisfy {contract}")
    accuracy = tags.get("test_accuracy") or (f"{run.data.metrics['test_accuracy']:.6f}"
                                              if run is not None and "test_accuracy" in run.data.metrics else None)
    limitations = (f"quality measured only on the test split of dataset {tags.get('dataset_md5', 'not recorded')}"
                   f"{f' (test accuracy {accuracy})' if accuracy else ''}; inputs outside the contract's ranges, "
                   "or whose class shares drift from that dataset, are not covered")
    if BREAKING_CHANGE_TAG in tags:
        limitations += f"; breaking change from the previous champion: {tags[BREAKING_CHANGE_TAG]}"
    return description, intended_use, limitations


def _documents(record: Any, run: Any, weights: Mapping[str, Any], version: str, alias: str,
               approval: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(weights, config, model card)`` of the release of ``record``."""
    from ml.checkpoint.release import release_documents

    tags = record.tags
    signature = json.loads(tags["input_signature"]) if "input_signature" in tags else {}
    metrics = {k: v for k, v in (run.data.metrics if run is not None else {}).items() if "/" not in k}
    if "test_accuracy" in tags:
        metrics["test_accuracy"] = float(tags["test_accuracy"])
    extra: dict[str, Any] = {"metrics": metrics, "run_id": record.run_id, "git_commit": tags.get("git_commit")}
    if signature:
        extra["features"] = [column for column, _ in signature.get("inputs", [])]
        extra["classes"] = signature.get("classes", [])
    if run is not None and run.data.params:
        extra["config"] = dict(sorted(run.data.params.items()))
    if "dataset_md5" in tags:
        extra["dataset"] = {"md5": tags["dataset_md5"], "source": tags.get("dataset_source"),
                            "path": tags.get("dataset_path"), "git_commit": tags.get("git_commit")}
    description, intended_use, limitations = _card_texts(record, run, alias)
    reference = f"models:/{record.name}/{record.version}"
    out_weights, config, card = release_documents({"model": dict(weights), "extra": extra}, {}, tier="registry",
                                                  name=reference, version=version, description=description,
                                                  intended_use=intended_use, limitations=limitations)
    card["source"] = {"registry": reference, "model": record.name, "model_version": record.version,
                      "run_id": record.run_id, "git_commit": tags.get("git_commit"),
                      "artifacts": record.source, "weights_digest": approval.weights_digest,
                      "approved_by": approval.approver, "approved_at": approval.at}
    if BREAKING_CHANGE_TAG in tags:
        card["breaking_change"] = tags[BREAKING_CHANGE_TAG]
    card["weights_sha256"] = weights_sha256(out_weights)
    return out_weights, config, card


def _load_approved(client: Any, record: Any, alias: str, local: str) -> tuple[Any, dict[str, Any] | None]:
    """The version's signed approval, checked over the files in ``local`` (raising as a refused
    promotion does), and its PyTorch weights, or None when the artifacts are no PyTorch model."""
    from mlflow.models import Model

    from registry.store import raise_unless_approved, run_author

    verdict = verify_tags(record.name, record.version, record.tags, Keyring.load(),
                          weights_digest=directory_digest(local), author=run_author(client, record.run_id))
    raise_unless_approved(record, verdict, alias)
    if not (Path(local) / "MLmodel").is_file() or "pytorch" not in Model.load(local).flavors:
        return verdict.record, None
    import mlflow.pytorch

    module = mlflow.pytorch.load_model(local, map_location="cpu")
    return verdict.record, {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _adopt_or_refuse(manager: Any, record: Any, version: str, digest: str) -> bool:
    """Whether ``production/<version>`` is this version's own release (a promotion that stopped
    before tagging it): then it is adopted. Anything else there is refused, never overwritten."""
    from ml.checkpoint.store import CheckpointCorrupt

    where = manager.tier_dir("production") / version
    if not where.exists():
        return False
    try:
        card = manager.load_production(version).model_card
    except CheckpointCorrupt:
        card = {}
    source = card.get("source", {}) if isinstance(card, dict) else {}
    if (source.get("model"), source.get("model_version"), card.get("weights_sha256")) == (
            record.name, record.version, digest):
        return True
    owner = (f"{source['model']} v{source['model_version']}" if source.get("model") else "another publisher")
    raise ReleaseExists(f"promote {record.name} v{record.version}: release {version} already exists at {where} "
                        f"(from {owner}); releases are never overwritten: move it away or set checkpoint.dir "
                        "to this model's own release root")


def publish_release(client: Any, name: str, version: str | int, checkpoint: Any,
                    alias: str = CHAMPION) -> tuple[Release | None, str]:
    """Makes sure the version about to take ``alias`` has its production release, before the alias
    moves. Returns the release (None when there is none) and one line saying what happened.

    Only the champion alias gets releases; a version that has one keeps it (nothing is written).
    Otherwise the version's artifacts are downloaded once, its signed approval is checked over
    them (a version that may not take the alias is refused here, before anything is written), its
    weights are published as the model's next release and the version is tagged.

    Args:
        checkpoint: the checkpoint settings (``CheckpointConfig``): root and S3 mirror; None reads
            the runtime settings when a release is written.

    Raises:
        RegistryError: the approval does not verify, or the artifacts cannot be read.
        ReleaseExists: the next release version is already in the production tier.
    """
    from ml.train.checkpoints import open_checkpoints
    from registry.store import download_version, get_version

    record = get_version(client, name, version)
    if alias != CHAMPION:
        return None, f"{alias} takes no release (releases follow {CHAMPION})"
    existing = release_of(record.name, record.version, record.tags)
    if existing is not None:
        _point_latest(existing.version, checkpoint)
        return existing, f"{name} v{record.version}: {existing.line()}"
    with tempfile.TemporaryDirectory(prefix="mlops-release-") as tmp:
        local = download_version(client, name, record.version, tmp)
        approval, weights = _load_approved(client, record, alias, local)
    if weights is None:
        return None, (f"{name} v{record.version}: no release (its artifacts are not an MLflow PyTorch model, "
                      "so there are no weights for the production tier)")
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(record.run_id) if record.run_id else None
    except MlflowException:
        run = None
    release_version = next_release_version(model_releases(client, name), BREAKING_CHANGE_TAG in record.tags)
    weights, config, card = _documents(record, run, weights, release_version, alias, approval)
    if checkpoint is None:
        from ml.settings import load_settings

        checkpoint = load_settings().checkpoint
    with open_checkpoints(checkpoint) as manager:
        if not _adopt_or_refuse(manager, record, release_version, card["weights_sha256"]):
            manager.save_production_checkpoint(weights, release_version, config, card)
        release = _verify_published(manager, record, release_version, card["weights_sha256"])
    for key, value in ((RELEASE_VERSION_TAG, release.version), (RELEASE_SHA256_TAG, release.sha256),
                       (RELEASE_WEIGHTS_TAG, release.weights_sha256), (RELEASE_LOCATION_TAG, release.location)):
        client.set_model_version_tag(name, record.version, key, value)
    return release, f"{name} v{record.version}: {release.line()}"


def _point_latest(version: str, checkpoint: Any) -> None:
    """The production tier's ``latest`` follows the live release when an older one is live again,
    locally and on the mirror, wherever the release is committed. An unreachable mirror leaves its
    pointer as it was, with a warning: a rollback is never refused for it."""
    from ml.checkpoint.s3 import CheckpointMirrorError
    from ml.train.checkpoints import open_checkpoints

    if checkpoint is None:
        from ml.settings import load_settings

        checkpoint = load_settings().checkpoint
    with open_checkpoints(checkpoint) as manager:
        try:
            manager.point_latest_release(version)
        except CheckpointMirrorError as exc:
            logger.warning("production latest not moved to %s on the mirror: %s", version, exc)


def _verify_published(manager: Any, record: Any, version: str, digest: str) -> Release:
    """The release as committed: its files verify and its tensors are the ones published."""
    from ml.checkpoint.store import read_manifest

    published = manager.load_production(version)
    if weights_sha256(published.weights) != digest:
        raise ReleaseMismatch(f"release {version} at {manager.tier_dir('production') / version}: its "
                              f"{WEIGHTS_FILE} does not hold the weights of {record.name} v{record.version}")
    where = manager.tier_dir("production") / version
    sha256 = read_manifest(where)["files"][WEIGHTS_FILE]["sha256"]
    location = str(where.resolve()) + (f" {manager.mirror.url('production', version)}" if manager.mirror else "")
    return Release(version, record.name, record.version, sha256, digest, location, published=True)
