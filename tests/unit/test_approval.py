from datetime import UTC, datetime

import pytest

from ml.errors import RegistryError
from registry.approval import (APPROVED, PENDING, REJECTED, can_promote, check_approver, check_transition,
                               make_event, meets_quality_gate)


@pytest.mark.parametrize("current, target, legal", [
    (PENDING, APPROVED, True),
    (PENDING, REJECTED, True),
    (APPROVED, REJECTED, True),
    (APPROVED, APPROVED, False),
    (APPROVED, PENDING, False),
    (REJECTED, APPROVED, False),
    (REJECTED, PENDING, False),
    (REJECTED, REJECTED, False),
    (PENDING, PENDING, False),
    (PENDING, "Archived", False),
])
def test_transition_table(current, target, legal):
    if legal:
        check_transition(current, target)
    else:
        with pytest.raises(RegistryError):
            check_transition(current, target)


def test_illegal_transition_message_lists_what_is_allowed():
    with pytest.raises(RegistryError, match=r"^illegal transition Rejected -> Approved; from Rejected allowed: none"):
        check_transition(REJECTED, APPROVED)


@pytest.mark.parametrize("approver, author, allow, outcome", [
    ("alice", "bob", False, False),
    ("alice", None, False, False),
    ("bob", "bob", True, True),
    ("bob", "bob", False, RegistryError),
    ("", "bob", False, RegistryError),
])
def test_separation_of_duties(approver, author, allow, outcome):
    if outcome is RegistryError:
        with pytest.raises(RegistryError):
            check_approver(approver, author, allow)
    else:
        assert check_approver(approver, author, allow) is outcome


def test_event_records_who_when_why():
    event = make_event(PENDING, APPROVED, "alice", "  fine  ", False, now=datetime(2026, 1, 2, tzinfo=UTC))
    assert event.to_dict() == {"from_status": PENDING, "to_status": APPROVED, "by": "alice",
                               "at": "2026-01-02T00:00:00+00:00", "reason": "fine", "self_approval": False}
    with pytest.raises(RegistryError, match="reason"):
        make_event(PENDING, APPROVED, "alice", " ", False)


@pytest.mark.parametrize("status, ok", [(APPROVED, True), (PENDING, False), (REJECTED, False)])
def test_only_approved_is_promotable(status, ok):
    assert can_promote(status) is ok


@pytest.mark.parametrize("accuracy, threshold, ok", [(0.95, 0.9, True), (0.9, 0.9, True), (0.89, 0.9, False)])
def test_quality_gate(accuracy, threshold, ok):
    passed, why = meets_quality_gate({"accuracy": accuracy}, threshold)
    assert passed is ok and f"{threshold:.4f}" in why
