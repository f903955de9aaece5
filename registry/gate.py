"""What was set outside the approval gate, reported: versions whose tags claim a decision their
signature does not prove, and an alias that points at a version whose approval does not verify
("champion set outside the gate"). The promotion flow can move such an alias back to the last
verified holder; ``mlops models list|show`` print the findings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from registry import store
from registry.approval import CHAMPION
from registry.signing import Keyring, Verdict
from registry.store import VersionRecord


@dataclass(frozen=True)
class Finding:
    """One thing set outside the gate: ``version`` and, for an alias, its name."""

    version: str
    why: str
    alias: str | None = None

    def line(self, name: str) -> str:
        if self.alias:
            return f"{name}@{self.alias} -> v{self.version}: {self.alias} set outside the gate: {self.why}"
        return f"{name} v{self.version}: unverified: {self.why}"


def claim_findings(records: list[VersionRecord], verdicts: dict[str, Verdict]) -> list[Finding]:
    """Versions whose tags claim something the signature does not prove, and aliases on versions
    whose approval does not verify. Pure: ``verdicts`` maps version to its verdict."""
    findings = []
    for record in records:
        verdict = verdicts[record.version]
        if verdict.why:
            findings.append(Finding(record.version, verdict.why))
        for alias in record.aliases:
            if not verdict.approved:
                why = verdict.why or f"its signed status is {verdict.status}"
                findings.append(Finding(record.version, why, alias))
    return findings


def list_findings(client: Any, name: str, keyring: Keyring | None = None,
                  weights: bool = False) -> tuple[list[VersionRecord], dict[str, Verdict], list[Finding]]:
    """Every version of ``name`` with its verdict, and the findings. ``weights``: also download and
    digest the artifacts of each version an alias points at (what serving would load)."""
    keyring = keyring or Keyring.load()
    records = store.list_versions(client, name)
    verdicts = {r.version: store.verify_version(client, r, keyring, weights=weights and bool(r.aliases))
                for r in records}
    return records, verdicts, claim_findings(records, verdicts)


def last_verified_holder(client: Any, name: str, alias: str, keyring: Keyring, exclude: str) -> str | None:
    """The latest earlier holder of ``alias`` (by its promotion history, newest first) whose
    approval verifies, weights included; None when there is none."""
    seen = {exclude}
    for entry in reversed(store.alias_history(client, name, alias)):
        for version in (entry.get("version"), entry.get("previous")):
            if not version or version in seen:
                continue
            seen.add(version)
            try:
                record = store.get_version(client, name, version)
            except Exception:  # noqa: BLE001 - a deleted version is simply no candidate
                continue
            if store.verify_version(client, record, keyring).approved:
                return record.version
    return None


def revert_unverified_alias(client: Any, name: str, by: str, alias: str = CHAMPION,
                            keyring: Keyring | None = None) -> dict[str, Any] | None:
    """When ``alias`` points at a version whose approval does not verify, moves it back to the last
    verified holder (or removes it when there is none) and records that in the alias history.
    Returns the history entry written, None when the alias was fine or unset."""
    keyring = keyring or Keyring.load()
    holder = store.champion(client, name, alias)
    if holder is None:
        return None
    verdict = store.verify_version(client, holder, keyring)
    if verdict.approved:
        return None
    target = last_verified_holder(client, name, alias, keyring, exclude=holder.version)
    entry = {"version": target, "previous": holder.version, "by": by,
             "at": datetime.now(UTC).isoformat(timespec="seconds"),
             "reverted": f"v{holder.version} was set outside the gate: {verdict.why or verdict.status}"}
    history = store.alias_history(client, name, alias) + [entry]
    client.set_registered_model_tag(name, store.alias_history_tag(alias), json.dumps(history[-store.HISTORY_KEPT:]))
    if target is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, target)
    return entry



def verdict_dict(verdict: Verdict) -> dict[str, Any]:
    """A verdict for JSON output."""
    record = verdict.record
    return {"approved": verdict.approved, "signed_status": verdict.status, "problem": verdict.why or None,
            "signed_by": record.approver if record else None, "identity": record.identity if record else None,
            "key_id": record.key_id if record else None, "signed_at": record.at if record else None}


def flag(verdict: Verdict) -> str:
    """What ``mlops models list`` appends to a version's line: nothing when the tags tell the truth."""
    return f"  UNVERIFIED: {verdict.why}" if verdict.why else ""


def show_lines(name: str, record: VersionRecord, verdict: Verdict) -> list[str]:
    """What ``mlops models show`` adds under a version: who signed, or why its approval does not verify."""
    lines = [f"  approval: UNVERIFIED: {verdict.why}" if verdict.why else
             f"  approval: {verdict.line()}" if verdict.record else "  approval: no signed decision"]
    lines += [f"  {f.line(name)}" for f in claim_findings([record], {record.version: verdict}) if f.alias]
    return lines
