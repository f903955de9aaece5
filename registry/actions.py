"""The authorized registry actions: approve, reject, promote, roll back.

Every caller that changes a version's approval or an alias goes through here (the ``mlops models``
commands, the promotion flow), so each request is checked the same way before anything changes:

1. who acts: against an ``mlflow server`` with basic auth, the authenticated user (a different
   ``approver`` is refused); against a local store, the given approver or the OS user;
2. the version exists;
3. with an authenticating server, the user holds MANAGE on the registered model (or is an admin).

Then :mod:`registry.store` decides and writes. A 401/403 from the server on any call becomes a
one-line :class:`RegistryError`.
"""

from __future__ import annotations

import getpass
import os
from typing import Any

from ml.errors import RegistryError
from registry import store
from registry.approval import APPROVED, CHAMPION, REJECTED, VIA_CLI, unrecorded_transition
from registry.auth import check_can_manage, denied_as_error, server_identity
from registry.store import VersionRecord


def registry_client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    from ml.tracking.mlflow_tracker import resolve_uri

    uri = resolve_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def local_user() -> str:
    """The name a store without authentication records: MLFLOW_TRACKING_USERNAME, else the OS user."""
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


def acting_user(tracking_uri: str, client: Any, name: str, version: str | int | None, what: str,
                claimed: str | None = None) -> str:
    """The user a registry change is recorded under, once they are allowed to make it.

    ``claimed`` is a name given on the command line; an authenticating server overrides it with the
    user it authenticated, and refuses a claim that differs.
    """
    identity = server_identity(tracking_uri, what)
    if identity is None:
        return claimed or local_user()
    if claimed and claimed != identity.username:
        raise RegistryError(f"{what}: approver {claimed!r} is not the authenticated user {identity.username!r}; "
                            "with an authenticating server the approver is the authenticated user")
    if version is not None:
        store.get_version(client, name, version)
    check_can_manage(tracking_uri, identity, name, what)
    return identity.username


def _decide(tracking_uri: str, name: str, version: str | int, target: str, reason: str, approver: str | None,
            allow_self_approval: bool, via: str) -> VersionRecord:
    verb = "approve" if target == APPROVED else "reject"
    what = f"{verb} {name} v{version}"
    client = registry_client(tracking_uri)
    with denied_as_error(what):
        by = acting_user(tracking_uri, client, name, version, what, claimed=approver)
        return store.decide(client, name, version, target, by, reason, allow_self_approval, via=via)


def approve_version(tracking_uri: str, name: str, version: str | int, reason: str, approver: str | None = None,
                    allow_self_approval: bool = False, via: str = VIA_CLI) -> VersionRecord:
    """PendingManualApproval -> Approved, recorded under the acting user."""
    return _decide(tracking_uri, name, version, APPROVED, reason, approver, allow_self_approval, via)


def reject_version(tracking_uri: str, name: str, version: str | int, reason: str, approver: str | None = None,
                   via: str = VIA_CLI) -> VersionRecord:
    """Pending or Approved -> Rejected; a rejected version loses its aliases."""
    return _decide(tracking_uri, name, version, REJECTED, reason, approver, False, via)


def promote_version(tracking_uri: str, name: str, version: str | int, alias: str = CHAMPION,
                    note: dict[str, str] | None = None) -> VersionRecord:
    """Points ``alias`` at an Approved version, recording the version it replaces."""
    what = f"promote {name} v{version}"
    client = registry_client(tracking_uri)
    with denied_as_error(what):
        by = acting_user(tracking_uri, client, name, version, what)
        return store.promote(client, name, version, by, alias, note=note)


def rollback_alias(tracking_uri: str, name: str, alias: str = CHAMPION) -> VersionRecord:
    """Gives ``alias`` back to the version it had before its last promotion."""
    what = f"rollback {name}"
    client = registry_client(tracking_uri)
    with denied_as_error(what):
        by = acting_user(tracking_uri, client, name, None, what)
        return store.rollback(client, name, by, alias)


def notice_hand_edit(tracking_uri: str, name: str, version: str | int) -> VersionRecord:
    """Reads a version, first recording in its history a status someone set by editing the tag.

    Writing that event is a history write like any other, so it needs the same MANAGE permission.
    """
    what = f"record approval of {name} v{version}"
    client = registry_client(tracking_uri)
    with denied_as_error(what):
        record = store.get_version(client, name, version)
        if unrecorded_transition(record.status, record.history) is None:
            return record
        by = acting_user(tracking_uri, client, name, version, what)
        return store.record_hand_edit(client, name, version, noticed_by=by)
