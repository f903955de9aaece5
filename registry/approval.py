"""The approval state machine and the promotion decisions: pure functions over plain records.

MLflow OSS has no approval workflow, so a version's state lives in its tags: ``approval_status`` and
an append-only ``approval_history`` (JSON), and what proves a decision is its signed record
(:mod:`registry.signing`): tags anyone with EDIT can set are never taken for a decision. Only a
version whose signed Approved record verifies may take the champion alias.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from ml.errors import RegistryError

PENDING = "PendingManualApproval"
APPROVED = "Approved"
REJECTED = "Rejected"
STATUSES = (PENDING, APPROVED, REJECTED)
CHAMPION = "champion"

# Where a decision was given: the mlops command, or another caller of registry.actions (the flow).
VIA_CLI = "cli"

# (from, to): Approved -> Rejected is a revocation.
LEGAL_TRANSITIONS = frozenset({(PENDING, APPROVED), (PENDING, REJECTED), (APPROVED, REJECTED)})


@dataclass(frozen=True)
class ApprovalEvent:
    """One entry of a version's approval history."""

    from_status: str
    to_status: str
    by: str
    at: str
    reason: str
    self_approval: bool = False
    via: str = VIA_CLI

    def to_dict(self) -> dict:
        return asdict(self)


def check_transition(current: str, target: str) -> None:
    """Raises with a clear message unless ``current -> target`` is legal."""
    if target not in STATUSES:
        raise RegistryError(f"status {target!r}: expected one of {', '.join(STATUSES)}")
    if (current, target) not in LEGAL_TRANSITIONS:
        allowed = sorted(t for f, t in LEGAL_TRANSITIONS if f == current) or ["none: it is final"]
        raise RegistryError(f"illegal transition {current} -> {target}; from {current} allowed: {', '.join(allowed)}")


def check_approver(approver: str, author: str | None, allow_self_approval: bool) -> bool:
    """Separation of duties. Returns whether this is a recorded self-approval."""
    if not approver:
        raise RegistryError("approver: expected a user name, got none")
    if author and approver == author:
        if not allow_self_approval:
            raise RegistryError(f"approver {approver!r} is the author of the source run; "
                                "another user must approve, or pass --allow-self-approval (recorded)")
        return True
    return False


def make_event(current: str, target: str, approver: str, reason: str, self_approval: bool,
               now: datetime | None = None, via: str = VIA_CLI) -> ApprovalEvent:
    check_transition(current, target)
    if not reason.strip():
        raise RegistryError("reason: expected a non-empty reason for the decision")
    at = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    return ApprovalEvent(current, target, approver, at, reason.strip(), self_approval, via)


def recorded_status(history: list[dict] | tuple[dict, ...]) -> str:
    """The status the history says a version is in: its last event's target, else pending."""
    return history[-1]["to_status"] if history else PENDING


def can_promote(status: str) -> bool:
    return status == APPROVED


def check_promotable(version: str, status: str) -> None:
    if not can_promote(status):
        raise RegistryError(f"version {version} is {status}; only an {APPROVED} version can become {CHAMPION}")


def is_better_than_champion(challenger_accuracy: float, champion_accuracy: float, champion_version: str,
                            min_delta: float) -> tuple[bool, str]:
    """The champion/challenger gate: both accuracies measured on the same test set; the challenger
    must reach the champion's plus ``min_delta`` (negative: may be that much worse)."""
    delta = challenger_accuracy - champion_accuracy
    verdict = (f"challenger test accuracy {challenger_accuracy:.4f} minus champion v{champion_version}'s "
               f"{champion_accuracy:.4f} on the same test set = {delta:+.4f}")
    if delta < min_delta:
        return False, f"{verdict}, below register.champion_min_delta {min_delta:+.4f}"
    return True, f"{verdict} >= register.champion_min_delta {min_delta:+.4f}"


def meets_quality_gate(metrics: dict[str, float], min_test_accuracy: float) -> tuple[bool, str]:
    """Whether test metrics clear the registration threshold, and why."""
    accuracy = metrics.get("accuracy", 0.0)
    if accuracy < min_test_accuracy:
        return False, f"test accuracy {accuracy:.4f} is below register.min_test_accuracy {min_test_accuracy:.4f}"
    return True, f"test accuracy {accuracy:.4f} >= {min_test_accuracy:.4f}"
