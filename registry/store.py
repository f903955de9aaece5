"""The registry's MLflow side: register, read, approve/reject, promote and roll back versions.

Each function makes its decision with :mod:`registry.approval` and then acts with one MLflow call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ml.errors import RegistryError
from registry.approval import (APPROVED, CHAMPION, PENDING, REJECTED, check_approver, check_promotable,
                               make_event)

STATUS_TAG = "approval_status"
HISTORY_TAG = "approval_history"
CHAMPION_HISTORY_TAG = "champion_history"


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


def get_version(client: Any, name: str, version: str | int) -> VersionRecord:
    from mlflow.exceptions import MlflowException

    try:
        return _record(client.get_model_version(name, str(version)))
    except MlflowException:
        raise RegistryError(f"model {name!r} version {version}: not found in the registry") from None


def list_versions(client: Any, name: str) -> list[VersionRecord]:
    # search results carry no aliases; the registered model has them all
    aliases = client.get_registered_model(name).aliases or {}
    versions = client.search_model_versions(f"name = '{name}'")
    return sorted((_record(mv, tuple(a for a, v in aliases.items() if str(v) == str(mv.version)))
                   for mv in versions), key=lambda r: int(r.version))


def champion(client: Any, name: str) -> VersionRecord | None:
    from mlflow.exceptions import MlflowException

    try:
        return _record(client.get_model_version_by_alias(name, CHAMPION))
    except MlflowException:
        return None


def register_version(client: Any, name: str, model_uri: str, run_id: str, tags: dict[str, Any]) -> VersionRecord:
    """A new version, pending approval, carrying its lineage tags. It never moves an alias."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Registered by mlops-pipeline; approve before promotion.")
    all_tags = {**{k: str(v) for k, v in tags.items()}, STATUS_TAG: PENDING, HISTORY_TAG: "[]"}
    mv = client.create_model_version(name, model_uri, run_id=run_id, tags=all_tags)
    return get_version(client, name, mv.version)


def run_author(client: Any, run_id: str | None) -> str | None:
    if not run_id:
        return None
    return client.get_run(run_id).data.tags.get("mlflow.user")


def decide(client: Any, name: str, version: str | int, target: str, approver: str, reason: str,
           allow_self_approval: bool = False) -> VersionRecord:
    """Moves a version to Approved or Rejected, appending who, when and why to its history."""
    record = get_version(client, name, version)
    self_approval = False
    if target == APPROVED:
        self_approval = check_approver(approver, run_author(client, record.run_id), allow_self_approval)
    event = make_event(record.status, target, approver, reason, self_approval)
    history = [*record.history, event.to_dict()]
    client.set_model_version_tag(name, record.version, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(name, record.version, STATUS_TAG, target)
    if target == REJECTED and CHAMPION in record.aliases:
        client.delete_registered_model_alias(name, CHAMPION)
    return get_version(client, name, record.version)


def _champion_history(client: Any, name: str) -> list[dict]:
    tags = client.get_registered_model(name).tags or {}
    return json.loads(tags.get(CHAMPION_HISTORY_TAG, "[]"))


def promote(client: Any, name: str, version: str | int, by: str) -> VersionRecord:
    """Points ``champion`` at an Approved version and records the one it replaces."""
    record = get_version(client, name, version)
    check_promotable(record.version, record.status)
    previous = champion(client, name)
    history = _champion_history(client, name)
    history.append({"version": record.version, "previous": previous.version if previous else None,
                    "by": by, "at": datetime.now(UTC).isoformat(timespec="seconds")})
    client.set_registered_model_tag(name, CHAMPION_HISTORY_TAG, json.dumps(history[-50:]))
    client.set_registered_model_alias(name, CHAMPION, record.version)
    return get_version(client, name, record.version)


def rollback(client: Any, name: str, by: str) -> VersionRecord:
    """Gives ``champion`` back to the version it had before the last promotion."""
    current = champion(client, name)
    if current is None:
        raise RegistryError(f"model {name!r} has no {CHAMPION}; nothing to roll back")
    previous = next((h["previous"] for h in reversed(_champion_history(client, name))
                     if h["version"] == current.version and h["previous"]), None)
    if previous is None:
        raise RegistryError(f"model {name!r}: no earlier {CHAMPION} recorded before version {current.version}")
    return promote(client, name, previous, by)
