"""The registry's MLflow side: register, read, approve/reject, promote and roll back versions.

Each function makes its decision with :mod:`registry.approval` and then acts with MLflow calls. These
functions trust their caller about who acts; :mod:`registry.actions` authorizes first. A decision
is signed with the approver's key (:mod:`registry.signing`) over the version's weights as they are
downloaded now; what a version's tags claim is only believed where that signature verifies.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ml.errors import RegistryError
from registry.approval import APPROVED, CHAMPION, PENDING, REJECTED, VIA_CLI, check_approver, check_promotable, make_event
from registry.signing import (SIGNATURE_TAG, ApprovalRecord, Keyring, Verdict, directory_digest, load_private_key,
                              sign, signer_key_id, verify_tags)

STATUS_TAG = "approval_status"
HISTORY_TAG = "approval_history"
CHAMPION_HISTORY_TAG = "champion_history"
HISTORY_KEPT = 50


@dataclass(frozen=True)
class VersionRecord:
    """A model version as the registry governs it."""

    name: str
    version: str
    status: str
    run_id: str | None
    source: str
    aliases: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    history: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "status": self.status, "run_id": self.run_id,
                "source": self.source, "aliases": list(self.aliases), "tags": self.tags,
                "history": list(self.history)}


def _record(mv: Any, aliases: tuple[str, ...] | None = None) -> VersionRecord:
    tags = dict(mv.tags or {})
    history = tuple(json.loads(tags.get(HISTORY_TAG, "[]")))
    aliases = tuple(getattr(mv, "aliases", []) or []) if aliases is None else aliases
    return VersionRecord(mv.name, str(mv.version), tags.get(STATUS_TAG, PENDING), mv.run_id, mv.source,
                         aliases, tags, history)


def is_not_found(exc: Exception) -> bool:
    """Whether an MlflowException says the thing asked for does not exist (not: access denied)."""
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE",
                                              "ENDPOINT_NOT_FOUND")


def get_version(client: Any, name: str, version: str | int) -> VersionRecord:
    from mlflow.exceptions import MlflowException

    try:
        return _record(client.get_model_version(name, str(version)))
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
        raise RegistryError(f"model {name!r} version {version}: not found in the registry") from None


def list_versions(client: Any, name: str) -> list[VersionRecord]:
    from mlflow.exceptions import MlflowException

    # search results carry no aliases; the registered model has them all
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
        raise RegistryError(f"model {name!r}: not found in the registry") from None
    versions = client.search_model_versions(f"name = '{name}'")
    return sorted((_record(mv, tuple(a for a, v in aliases.items() if str(v) == str(mv.version)))
                   for mv in versions), key=lambda r: int(r.version))


def champion(client: Any, name: str, alias: str = CHAMPION) -> VersionRecord | None:
    """The version holding ``alias``, or None (also when the model does not exist yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return _record(client.get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
        return None


def register_version(client: Any, name: str, model_uri: str, run_id: str, tags: dict[str, Any]) -> VersionRecord:
    """A new version, pending approval, carrying its lineage tags. It never moves an alias."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
        try:
            client.create_registered_model(name, description="Registered by mlops-pipeline; approve before promotion.")
        except MlflowException as created:  # another flow run registered the name first: use it
            if created.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    all_tags = {**{k: str(v) for k, v in tags.items()}, STATUS_TAG: PENDING, HISTORY_TAG: "[]"}
    # a logged model's URI (models:/m-<id>) names its model id, which an MLflow server requires with it
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    mv = client.create_model_version(name, model_uri, run_id=run_id, tags=all_tags, model_id=model_id)
    return get_version(client, name, mv.version)


def run_author(client: Any, run_id: str | None) -> str | None:
    if not run_id:
        return None
    return client.get_run(run_id).data.tags.get("mlflow.user")


def client_tracking_uri(client: Any) -> str:
    """The tracking URI an MlflowClient was made for (artifact downloads resolve against it)."""
    return client._tracking_client.tracking_uri


def download_version(client: Any, name: str, version: str, dst: str) -> str:
    """Downloads a version's model artifacts into ``dst``; the local directory that holds them."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    # the version's own artifact location: a models:/ URI would be resolved against the
    # process-wide registry URI, not this client's
    source = client.get_model_version_download_uri(name, version)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a step of a command, not a download
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst,
                                                   tracking_uri=client_tracking_uri(client))
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"model {name!r} version {version}: its model artifacts at {source} could not be "
                            f"read ({str(exc).splitlines()[0][:200]})") from None


def weights_digest(client: Any, name: str, version: str) -> str:
    """The digest a signed record binds: every file of the version's model artifacts."""
    with tempfile.TemporaryDirectory(prefix="mlops-digest-") as tmp:
        local = download_version(client, name, version, tmp)
        try:
            return directory_digest(local)
        except RegistryError:
            raise RegistryError(f"model {name!r} version {version}: no model artifacts to sign") from None


def verify_version(client: Any, record: VersionRecord, keyring: Keyring | None = None,
                   weights: bool = True) -> Verdict:
    """What ``record``'s signed decision proves: signature, key, model and version always; with
    ``weights``, also the artifacts' digest as downloaded now and separation of duties."""
    keyring = keyring or Keyring.load()
    verdict = verify_tags(record.name, record.version, record.tags, keyring)
    if not weights or not verdict.approved:
        return verdict
    try:
        digest = weights_digest(client, record.name, record.version)
    except RegistryError as exc:
        return Verdict(False, verdict.status, str(exc), verdict.record)
    return verify_tags(record.name, record.version, record.tags, keyring, weights_digest=digest,
                       author=run_author(client, record.run_id))


def decide(client: Any, name: str, version: str | int, target: str, approver: str, reason: str,
           allow_self_approval: bool = False, via: str = VIA_CLI, *, identity: str = "local user") -> VersionRecord:
    """Moves a version to Approved or Rejected: a record of who, when and why over the version's
    weights, signed with the approver's key (created on first use), and a history entry.

    The decision it follows is the last one whose signature verifies: an ``approval_status`` tag
    edited by hand is never adopted. Every check, the download of the weights and the signature
    come before the first write. A rejected version loses its aliases.
    """
    record = get_version(client, name, version)
    keyring = Keyring.load()
    current = verify_tags(name, record.version, record.tags, keyring).status
    self_approval = False
    if target == APPROVED:
        self_approval = check_approver(approver, run_author(client, record.run_id), allow_self_approval)
    event = make_event(current, target, approver, reason, self_approval, via=via)
    key = load_private_key()
    try:
        digest = weights_digest(client, name, record.version)
    except RegistryError:
        if target == APPROVED:
            raise
        digest = "unreadable"  # a version whose weights cannot be read can still be rejected
    signed = ApprovalRecord(name, record.version, digest, target, approver, event.at, event.reason, self_approval,
                            identity, signer_key_id(key))
    history = [*record.history, {**event.to_dict(), "identity": identity, "key_id": signed.key_id,
                                 "weights_digest": digest}]
    if current == APPROVED:  # a revocation: the approval stays withdrawn even if put back by hand
        keyring.revoke_approval(record.tags[SIGNATURE_TAG], name, record.version, approver)
        keyring.save()
    client.set_model_version_tag(name, record.version, HISTORY_TAG, json.dumps(history[-HISTORY_KEPT:]))
    client.set_model_version_tag(name, record.version, SIGNATURE_TAG, sign(signed, key))
    client.set_model_version_tag(name, record.version, STATUS_TAG, target)
    if target == REJECTED:
        for alias in record.aliases:  # a rejected version is served under no alias
            client.delete_registered_model_alias(name, alias)
    return get_version(client, name, record.version)


def alias_history_tag(alias: str) -> str:
    """The registered-model tag holding the promotions of ``alias`` (``champion_history``)."""
    return CHAMPION_HISTORY_TAG if alias == CHAMPION else f"{alias}_history"


def alias_history(client: Any, name: str, alias: str = CHAMPION) -> list[dict]:
    tags = client.get_registered_model(name).tags or {}
    return json.loads(tags.get(alias_history_tag(alias), "[]"))


def check_verified(client: Any, record: VersionRecord, alias: str, keyring: Keyring | None = None) -> None:
    """Raises unless ``record``'s signed Approved decision verifies, weights and author included."""
    raise_unless_approved(record, verify_version(client, record, keyring), alias)


def raise_unless_approved(record: VersionRecord, verdict: Verdict, alias: str) -> None:
    """Raises, saying why, unless ``verdict`` proves a signed Approved decision on ``record``."""
    if verdict.approved:
        return
    try:
        check_promotable(record.version, verdict.status)
    except RegistryError as exc:
        raise RegistryError(f"{exc}{f' ({verdict.why})' if verdict.why else ''}") from None
    raise RegistryError(f"version {record.version} cannot become {alias}: its approval does not verify: {verdict.why}")


def promote(client: Any, name: str, version: str | int, by: str, alias: str = CHAMPION,
            note: dict[str, str] | None = None) -> VersionRecord:
    """Points ``alias`` at a version whose signed approval verifies and records the one it replaces
    (``note`` adds fields to that record, e.g. the flow run that promoted). Promoting the holder
    again is a no-op."""
    record = get_version(client, name, version)
    check_verified(client, record, alias)
    previous = champion(client, name, alias)
    if previous is not None and previous.version == record.version:
        return record
    history = alias_history(client, name, alias)
    history.append({"version": record.version, "previous": previous.version if previous else None,
                    "by": by, "at": datetime.now(UTC).isoformat(timespec="seconds"), **(note or {})})
    client.set_registered_model_tag(name, alias_history_tag(alias), json.dumps(history[-HISTORY_KEPT:]))
    client.set_registered_model_alias(name, alias, record.version)
    return get_version(client, name, record.version)


def rollback(client: Any, name: str, by: str, alias: str = CHAMPION,
             note: dict[str, str] | None = None) -> VersionRecord:
    """Gives ``alias`` back to the version it had before the last promotion."""
    return promote(client, name, rollback_target(client, name, alias), by, alias, note=note)


def rollback_target(client: Any, name: str, alias: str = CHAMPION) -> str:
    """The version a rollback of ``alias`` gives it back to: the one it had before its holder's promotion."""
    current = champion(client, name, alias)
    if current is None:
        raise RegistryError(f"model {name!r} has no {alias}; nothing to roll back")
    previous = next((h["previous"] for h in reversed(alias_history(client, name, alias))
                     if h["version"] == current.version and h["previous"]), None)
    if previous is None:
        raise RegistryError(f"model {name!r}: no earlier {alias} recorded before version {current.version}")
    return previous
