"""The checkpoint policy: when a save is due, which version strings and metric names are taken,
which checkpoints retention deletes, and the improvement rule milestones share with the rest."""

from __future__ import annotations

import math

import pytest

from ml.checkpoint.policy import (
    is_improvement,
    is_metric_name,
    is_semver,
    milestone_base_name,
    retention_victims,
    should_save,
    training_checkpoint_name,
)
from ml.metrics import is_improvement as the_one_rule


def test_milestones_use_the_one_improvement_rule():
    assert is_improvement is the_one_rule


@pytest.mark.parametrize(("best", "value", "mode", "expected"), [
    (None, 1.0, "min", True),
    (None, 1.0, "max", True),
    (1.0, 0.5, "min", True),
    (1.0, 1.0, "min", False),  # a tie is not an improvement
    (1.0, 1.5, "min", False),
    (1.0, 1.5, "max", True),
    (1.0, 1.0, "max", False),
    (1.0, 0.5, "max", False),
    (None, math.nan, "min", False),
    (1.0, math.nan, "max", False),
    (1.0, -math.inf, "min", False),
])
def test_is_improvement(best, value, mode, expected):
    assert is_improvement(best, value, mode) is expected


def test_is_improvement_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        is_improvement(None, 1.0, "minimum")


@pytest.mark.parametrize(("version", "valid"), [
    ("0.0.0", True), ("1.2.3", True), ("10.20.30", True), ("1.0.0-alpha", True), ("1.0.0-alpha.1", True),
    ("1.0.0-0.3.7", True), ("1.0.0-x-y-z.--", True), ("1.0.0+build.5", True), ("1.0.0-rc.1+sha.5114f85", True),
    ("1", False), ("1.2", False), ("1.2.3.4", False), ("v1.2.3", False), ("01.2.3", False), ("1.02.3", False),
    ("1.2.03", False), ("1.2.3-", False), ("1.2.3-01", False), ("1.2.3+", False), ("1.2.3-a..b", False),
    ("1.2.3 ", False), ("", False), ("1.2.3/../x", False), ("１.2.3", False),
])
def test_is_semver(version, valid):
    assert is_semver(version) is valid


@pytest.mark.parametrize(("step", "every_steps", "last", "now", "every_seconds", "expected"), [
    (4, 4, 0.0, 1.0, None, True),
    (5, 4, 0.0, 1.0, None, False),
    (5, None, 0.0, 1.0, None, False),
    (5, None, 0.0, 9.9, 10.0, False),
    (5, None, 0.0, 10.0, 10.0, True),
    (5, 4, 0.0, 11.0, 10.0, True),  # either condition is enough
    (8, 4, 0.0, 1.0, 10.0, True),
])
def test_should_save(step, every_steps, last, now, every_seconds, expected):
    assert should_save(step, every_steps, last, now, every_seconds) is expected


def test_names_sort_by_step_and_never_collide_at_an_epoch_end():
    assert training_checkpoint_name(120) == "step-00000120"
    assert training_checkpoint_name(120, 3) == "epoch-0003-step-00000120"
    assert training_checkpoint_name(120, 3) != training_checkpoint_name(120, 4)
    assert sorted([training_checkpoint_name(s) for s in (10, 9, 100)]) == [
        "step-00000009", "step-00000010", "step-00000100"]
    assert milestone_base_name("val_loss", 2, 40) == "val_loss-epoch-0002-step-00000040"


@pytest.mark.parametrize(("metric", "valid"), [
    ("val_loss", True), ("a.b-c_1", True), ("x" * 100, True), ("x" * 101, False), ("", False),
    ("../x", False), ("a/b", False), (".hidden", False), ("a b", False),
])
def test_metric_names(metric, valid):
    assert is_metric_name(metric) is valid


@pytest.mark.parametrize(("committed", "keep", "protected", "victims"), [
    (["a", "b", "c", "d"], 2, (), ["a", "b"]),
    (["a", "b", "c", "d"], 2, ("a",), ["b"]),  # a pointer's target is never deleted
    (["a", "b"], 2, (), []),
    (["a"], 2, (), []),
    (["a", "b", "c"], 0, ("c",), ["a", "b"]),
    ([], 3, ("x",), []),
])
def test_retention_deletes_only_the_oldest_beyond_keep(committed, keep, protected, victims):
    assert retention_victims(committed, keep, protected) == victims


def test_retention_refuses_a_negative_keep():
    with pytest.raises(ValueError, match="keep must be >= 0"):
        retention_victims(["a"], -1)
