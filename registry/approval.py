"""The approval state machine and the promotion decisions: pure functions over plain records.

MLflow OSS has no approval workflow, so a version's state lives in its tags: ``approval_status`` and
an append-only ``approval_history`` (JSON). Only an Approved version may take the champion alias.
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
               now: datetime | None = None) -> ApprovalEvent:
    check_transition(current, target)
    if not reason.strip():
        raise RegistryError("reason: expected a non-empty reason for the decision")
    at = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    return ApprovalEvent(current, target, approver, at, reason.strip(), self_approval)


def can_promote(status: str) -> bool:
    return status == APPROVED


def check_promotable(version: str, status: str) -> None:
    if not can_promote(status):
        raise RegistryError(f"version {version} is {status}; only an {APPROVED} version can become {CHAMPION}")


def meets_quality_gate(metrics: dict[str, float], min_test_accuracy: float) -> tuple[bool, str]:
    """Whether test metrics clear the registration threshold, and why."""
    accuracy = metrics.get("accuracy", 0.0)
    if accuracy < min_test_accuracy:
        return False, f"test accuracy {accuracy:.4f} is below register.min_test_accuracy {min_test_accuracy:.4f}"
    return True, f"test accuracy {accuracy:.4f} >= {min_test_accuracy:.4f}"
