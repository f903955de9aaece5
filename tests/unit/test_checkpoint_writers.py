"""Checksums and writer threads: CRC-32C as the standard defines it, a running digest equal to a
one-shot one, and the training tier's writer threads at idle scheduling priority when asked."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import ml.checkpoint.manager as manager_module
from ml.checkpoint.checksums import CHECKSUMS, file_digest, new_digest
from ml.checkpoint.manager import CheckpointManager
from ml.checkpoint.snapshot import Snapshot
from ml.checkpoint.store import commit_checkpoint, read_manifest
from ml.checkpoint.writers import IdleThreads, bytes_writer

needs_sched_idle = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")


@pytest.mark.parametrize(("algorithm", "expected"), [
    ("crc32c", "e3069283"),  # the check value of CRC-32C (RFC 3720) for "123456789"
    ("crc32", "cbf43926"),  # and of zlib's CRC-32
    ("sha256", "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225"),
])
def test_check_values(algorithm, expected):
    assert new_digest(algorithm, b"123456789").hexdigest() == expected


@pytest.mark.parametrize("algorithm", CHECKSUMS)
def test_a_running_digest_over_chunks_equals_the_one_shot_digest(tmp_path, algorithm):
    data = os.urandom(3 * (1 << 20) + 17)
    running = new_digest(algorithm)
    view = memoryview(data)
    for off in range(0, len(data), 65_537):
        running.update(view[off:off + 65_537])
    (tmp_path / "f").write_bytes(data)
    assert running.hexdigest() == new_digest(algorithm, data).hexdigest() == file_digest(tmp_path / "f", algorithm)[1]


def test_an_unknown_checksum_is_refused():
    with pytest.raises(ValueError, match="checksum must be one of sha256, crc32c, crc32; got 'md5'"):
        new_digest("md5")


def probe(policies: list[int]):
    """A file writer that records the scheduling policy of the thread that runs it."""
    write = bytes_writer(b"{}")

    def run(path):
        policies.append(os.sched_getscheduler(0))
        return write(path)

    return run


@needs_sched_idle
@pytest.mark.parametrize(("idle", "expected"), [(True, "SCHED_IDLE"), (False, "SCHED_OTHER")])
def test_commit_writes_files_at_the_priority_asked_for_and_leaves_the_caller_alone(tmp_path, idle, expected):
    policies: list[int] = []
    before = os.sched_getscheduler(0)
    commit_checkpoint(tmp_path, "c", {"a.json": probe(policies), "b.json": probe(policies)}, {},
                      idle=IdleThreads() if idle else None)
    assert policies == [getattr(os, expected)] * 2
    assert os.sched_getscheduler(0) == before == os.SCHED_OTHER
    assert set(read_manifest(tmp_path / "c")["files"]) == {"a.json", "b.json"}


@needs_sched_idle
@pytest.mark.parametrize(("priority", "expected"), [("idle", "SCHED_IDLE"), ("normal", "SCHED_OTHER")])
def test_the_training_tier_writes_at_writer_priority_and_milestones_at_normal(tmp_path, monkeypatch, priority,
                                                                              expected):
    policies: list[int] = []
    copier: list[int] = []
    real_commit = manager_module.commit_checkpoint

    def commit_with_probe(tier_root, name, writers, meta, **kwargs):
        return real_commit(tier_root, name, {**writers, "probe.json": probe(policies)}, meta, **kwargs)

    monkeypatch.setattr(manager_module, "commit_checkpoint", commit_with_probe)
    real_complete = Snapshot.complete

    def complete(self):  # the snapshot copy, which the next optimizer.step() may wait for
        copier.append(os.sched_getscheduler(0))
        real_complete(self)

    monkeypatch.setattr(Snapshot, "complete", complete)
    with CheckpointManager(tmp_path, writer_priority=priority) as mgr:
        mgr.save_training_checkpoint({"model": {"w": torch.ones(3)}}, 1).result()
        assert policies == [getattr(os, expected)] and copier == [os.SCHED_OTHER]
        mgr.save_milestone_checkpoint({"model": {"w": torch.ones(3)}}, "loss", 1.0, "min", epoch=1, step=1)
        assert policies[1:] == [os.SCHED_OTHER]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_an_unknown_writer_priority_is_refused(tmp_path):
    with pytest.raises(ValueError, match="writer_priority must be one of normal, idle; got 'high'"):
        CheckpointManager(tmp_path, writer_priority="high")


@needs_sched_idle
def test_restore_puts_entered_threads_back_to_normal_and_later_ones_stay_normal():
    idle, entered, go, seen = IdleThreads(), threading.Event(), threading.Event(), []

    def writer():
        idle.enter()
        seen.append(os.sched_getscheduler(0))
        entered.set()
        assert go.wait(30)
        seen.append(os.sched_getscheduler(0))

    thread = threading.Thread(target=writer)
    thread.start()
    assert entered.wait(30)
    idle.restore()
    go.set()
    thread.join(30)
    late = threading.Thread(target=lambda: (idle.enter(), seen.append(os.sched_getscheduler(0))))
    late.start()
    late.join(30)
    assert seen == [os.SCHED_IDLE, os.SCHED_OTHER, os.SCHED_OTHER]


@needs_sched_idle
def test_waiting_for_a_save_puts_its_writer_threads_back_to_normal(tmp_path, monkeypatch):
    entered, release, restored = threading.Event(), threading.Event(), threading.Event()
    writer: dict = {}
    real_commit, real_restore = manager_module.commit_checkpoint, IdleThreads.restore

    def held(path):  # a writer thread of the save, held until the test has looked at it
        writer["tid"], writer["before"] = threading.get_native_id(), os.sched_getscheduler(0)
        entered.set()
        assert release.wait(30)
        return bytes_writer(b"{}")(path)

    def commit_with_held_writer(tier_root, name, writers, meta, **kwargs):
        return real_commit(tier_root, name, {**writers, "held.json": held}, meta, **kwargs)

    def restore(self):
        real_restore(self)
        restored.set()

    monkeypatch.setattr(manager_module, "commit_checkpoint", commit_with_held_writer)
    monkeypatch.setattr(IdleThreads, "restore", restore)
    with CheckpointManager(tmp_path, writer_priority="idle") as mgr:
        future = mgr.save_training_checkpoint({"model": {"w": torch.ones(3)}}, 1)
        assert entered.wait(30) and writer["before"] == os.SCHED_IDLE
        waiter = threading.Thread(target=mgr.wait)
        waiter.start()
        assert restored.wait(30)
        during_wait = os.sched_getscheduler(writer["tid"])
        release.set()
        waiter.join(30)
        assert future.result().name == "step-00000001"
    assert during_wait == os.SCHED_OTHER
