"""The authorized registry actions: approve, reject, promote, roll back.

Every caller that changes a version's approval or an alias goes through here (the ``mlops models``
commands, the promotion flow), so each request is checked the same way before anything changes:

1. who acts: against an ``mlflow server`` with basic auth, the authenticated user (a different
   ``approver`` is refused); against a local store, the given approver or the OS user;
2. the version exists;
3. with an authenticating server, the user holds MANAGE on the registered model (or is an admin).

Then :mod:`registry.store` decides, signs and writes (or, with ``$MLOPS_APPROVAL_SERVICE``, the
team's approval service does, after the same checks: :mod:`registry.service`): the signed record
names the approver and how they were identified. A 401/403 from the server on any call becomes a one-line :class:`RegistryError`.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import replace
from typing import Any

from ml.errors import RegistryError
from registry import gate, releases, store
from registry.approval import APPROVED, CHAMPION, REJECTED, VIA_CLI
from registry.auth import check_can_manage, denied_as_error, server_identity
from registry.service import SERVICE_ENV, request_decision
from registry.signing import Keyring, Verdict
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
                claimed: str | None = None) -> tuple[str, str]:
    """The user a registry change is recorded under, once they are allowed to make it, and how they
    were identified ("local user", or the authenticating server).

    ``claimed`` is a name given on the command line; an authenticating server overrides it with the
    user it authenticated, and refuses a claim that differs.
    """
    identity = server_identity(tracking_uri, what)
    if identity is None:
        return claimed or local_user(), "local user"
    if claimed and claimed != identity.username:
        raise RegistryError(f"{what}: approver {claimed!r} is not the authenticated user {identity.username!r}; "
                            "with an authenticating server the approver is the authenticated user")
    if version is not None:
        store.get_version(client, name, version)
    check_can_manage(tracking_uri, identity, name, what)
    return identity.username, f"authenticated by {public_server(tracking_uri)}"


def public_server(tracking_uri: str) -> str:
    """The server URI without credentials, fit for a signed record."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(tracking_uri)
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""), query=""))


def _decide(tracking_uri: str, name: str, version: str | int, target: str, reason: str, approver: str | None,
            allow_self_approval: bool, via: str) -> VersionRecord:
    verb = "approve" if target == APPROVED else "reject"
    what = f"{verb} {name} v{version}"
    client = registry_client(tracking_uri)
    with denied_as_error(what):
        by, identity = acting_user(tracking_uri, client, name, version, what, claimed=approver)
        service = os.environ.get(SERVICE_ENV)
        if service:  # the team's approval service signs; this user holds no key
            request_decision(service, tracking_uri, name, version, target, reason, allow_self_approval, what)
            return store.get_version(client, name, version)
        return store.decide(client, name, version, target, by, reason, allow_self_approval, via=via,
                            identity=identity)


def approve_version(tracking_uri: str, name: str, version: str | int, reason: str, approver: str | None = None,
                    allow_self_approval: bool = False, via: str = VIA_CLI) -> VersionRecord:
    """PendingManualApproval -> Approved, recorded under the acting user."""
    return _decide(tracking_uri, name, version, APPROVED, reason, approver, allow_self_approval, via)


def reject_version(tracking_uri: str, name: str, version: str | int, reason: str, approver: str | None = None,
                   via: str = VIA_CLI) -> VersionRecord:
    """Pending or Approved -> Rejected; a rejected version loses its aliases."""
    return _decide(tracking_uri, name, version, REJECTED, reason, approver, False, via)


def promote_version(tracking_uri: str, name: str, version: str | int, alias: str = CHAMPION,
                    note: dict[str, str] | None = None, checkpoint: Any = None) -> VersionRecord:
    """Points ``alias`` at an Approved version, recording the version it replaces. A version taking
    the champion alias gets its production release first (:func:`registry.releases.publish_release`,
    under ``checkpoint``, the checkpoint settings; default: those of the runtime settings), and the
    alias history entry names the release."""
    what = f"promote {name} v{version}"
    client = registry_client(tracking_uri)
    with denied_as_error(what):
        by, _ = acting_user(tracking_uri, client, name, version, what)
        return store.promote(client, name, version, by, alias, note=_with_release(client, name, version, alias,
                                                                                   checkpoint, note))


def rollback_alias(tracking_uri: str, name: str, alias: str = CHAMPION, checkpoint: Any = None) -> VersionRecord:
    """Gives ``alias`` back to the version it had before its last promotion; the alias history
    entry records the rollback and which release is live again."""
    what = f"rollback {name}"
    client = registry_client(tracking_uri)
    with denied_as_error(what):
        by, _ = acting_user(tracking_uri, client, name, None, what)
        target = store.rollback_target(client, name, alias)
        return store.promote(client, name, target, by, alias,
                             note=_with_release(client, name, target, alias, checkpoint, {"via": "rollback"}))


def _with_release(client: Any, name: str, version: str | int, alias: str, checkpoint: Any,
                  note: dict[str, str] | None) -> dict[str, str] | None:
    """``note`` plus the release of the version about to take ``alias``, published when it has none."""
    import logging

    release, line = releases.publish_release(client, name, version, checkpoint, alias)
    logging.getLogger(__name__).info(line)
    return {**(note or {}), "release": release.version} if release is not None else note


def read_verified(tracking_uri: str, name: str, version: str | int,
                  keyring: Keyring | None = None) -> tuple[VersionRecord, Verdict]:
    """A version with ``status`` set to the decision its signature proves (pending when none
    verifies), and the verdict: what its tags claim beyond that is reported, never adopted."""
    client = registry_client(tracking_uri)
    with denied_as_error(f"read {name} v{version}"):
        record = store.get_version(client, name, version)
        verdict = store.verify_version(client, record, keyring, weights=False)
    return replace(record, status=verdict.status), verdict


def check_gate(tracking_uri: str, name: str, alias: str = CHAMPION, revert: bool = False,
               keyring: Keyring | None = None) -> tuple[list[str], dict[str, Any] | None]:
    """What was set outside the gate on ``name`` (one line each; the holder of an alias is checked
    weights included) and, with ``revert``, the alias history entry written when ``alias`` pointed
    at an unverified version and was moved back (authorized like a promotion)."""
    what = f"check {name}@{alias}"
    client = registry_client(tracking_uri)
    with denied_as_error(what):
        _, _, findings = gate.list_findings(client, name, keyring, weights=True)
        lines = [f.line(name) for f in findings]
        if not revert or not any(f.alias == alias for f in findings):
            return lines, None
        by, _ = acting_user(tracking_uri, client, name, None, what)
        return lines, gate.revert_unverified_alias(client, name, by, alias, keyring)
