"""The registry's MLflow side: register, read, approve/reject, promote and roll back versions.

Each function makes its decision with :mod:`registry.approval` and then acts with MLflow calls. These
functions trust their caller about who acts; :mod:`registry.actions` authorizes first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ml.errors import RegistryError
from registry.approval import (APPROVED, CHAMPION, PENDING, REJECTED, VIA_CLI, ApprovalEvent, check_approver,
                               check_promotable, hand_edit_event, make_event, unrecorded_transition)

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
        client.create_registered_model(name, description="Registered by mlops-pipeline; approve before promotion.")
    all_tags = {**{k: str(v) for k, v in tags.items()}, STATUS_TAG: PENDING, HISTORY_TAG: "[]"}
    mv = client.create_model_version(name, model_uri, run_id=run_id, tags=all_tags)
    return get_version(client, name, mv.version)


def run_author(client: Any, run_id: str | None) -> str | None:
    if not run_id:
        return None
    return client.get_run(run_id).data.tags.get("mlflow.user")


def _hand_edits(record: VersionRecord, noticed_by: str) -> list[ApprovalEvent]:
    """The event a hand edit of the status tag needs in the history (none when the history agrees)."""
    edit = unrecorded_transition(record.status, record.history)
    return [hand_edit_event(*edit, noticed_by=noticed_by)] if edit else []


def _write_history(client: Any, record: VersionRecord, events: list[ApprovalEvent]) -> None:
    history = [*record.history, *(e.to_dict() for e in events)]
    client.set_model_version_tag(record.name, record.version, HISTORY_TAG, json.dumps(history))


def record_hand_edit(client: Any, name: str, version: str | int, noticed_by: str) -> VersionRecord:
    """Appends a history event when ``approval_status`` was edited by hand (MLflow UI), so the
    history again explains the status. Raises when the edit is not a legal transition."""
    record = get_version(client, name, version)
    events = _hand_edits(record, noticed_by)
    if not events:
        return record
    _write_history(client, record, events)
    return get_version(client, name, record.version)


def decide(client: Any, name: str, version: str | int, target: str, approver: str, reason: str,
           allow_self_approval: bool = False, via: str = VIA_CLI) -> VersionRecord:
    """Moves a version to Approved or Rejected, appending who, when and why to its history.

    A status set earlier by a hand edit of the tag is recorded first, so the history stays complete.
    Every check runs before the first write. A rejected version loses its aliases.
    """
    record = get_version(client, name, version)
    events = _hand_edits(record, noticed_by=approver)
    self_approval = False
    if target == APPROVED:
        self_approval = check_approver(approver, run_author(client, record.run_id), allow_self_approval)
    events.append(make_event(record.status, target, approver, reason, self_approval, via=via))
    _write_history(client, record, events)
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


def promote(client: Any, name: str, version: str | int, by: str, alias: str = CHAMPION,
            note: dict[str, str] | None = None) -> VersionRecord:
    """Points ``alias`` at an Approved version and records the one it replaces (``note`` adds
    fields to that record, e.g. the flow run that promoted). Promoting the holder again is a no-op."""
    record = get_version(client, name, version)
    check_promotable(record.version, record.status)
    events = _hand_edits(record, noticed_by=by)
    previous = champion(client, name, alias)
    if previous is not None and previous.version == record.version and not events:
        return record
    history = alias_history(client, name, alias)
    history.append({"version": record.version, "previous": previous.version if previous else None,
                    "by": by, "at": datetime.now(UTC).isoformat(timespec="seconds"), **(note or {})})
    if events:
        _write_history(client, record, events)
    client.set_registered_model_tag(name, alias_history_tag(alias), json.dumps(history[-HISTORY_KEPT:]))
    client.set_registered_model_alias(name, alias, record.version)
    return get_version(client, name, record.version)


def rollback(client: Any, name: str, by: str, alias: str = CHAMPION) -> VersionRecord:
    """Gives ``alias`` back to the version it had before the last promotion."""
    current = champion(client, name, alias)
    if current is None:
        raise RegistryError(f"model {name!r} has no {alias}; nothing to roll back")
    previous = next((h["previous"] for h in reversed(alias_history(client, name, alias))
                     if h["version"] == current.version and h["previous"]), None)
    if previous is None:
        raise RegistryError(f"model {name!r}: no earlier {alias} recorded before version {current.version}")
    return promote(client, name, previous, by, alias)
