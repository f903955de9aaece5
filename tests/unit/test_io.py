"""Atomic outputs get the permissions of any new file (the umask's), not tempfile's 0600/0700."""

from __future__ import annotations

import os
import stat

import pytest

from ml.io import atomic_write, atomic_write_text, replace_dir


def test_outputs_take_the_umask_not_owner_only(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.json", "{}\n")
        replace_dir(tmp_path / "model", lambda d: (d / "spec.json").write_text("{}"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "report.json"]  # no scratch left


def test_a_failed_write_leaves_the_previous_file_and_no_scratch(tmp_path):
    target = atomic_write_text(tmp_path / "metrics.json", "old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
