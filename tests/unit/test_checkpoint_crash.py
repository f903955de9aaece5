"""Crash safety: a writer SIGKILLed at random moments never leaves a partial checkpoint listed, and
every committed checkpoint stays loadable and byte-identical.

The moment is a file-system call: the child kills itself just before its N-th write, fsync, rename,
truncate, mkdir or delete (N drawn from a seeded generator), so every step of the commit protocol,
the pointer update and retention is hit, and a failure is reproducible."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import signal
import threading
from pathlib import Path

import pytest
import torch

from ml.checkpoint.manager import CheckpointManager
from ml.checkpoint.store import read_manifest, read_pointer, scan_tier

KILLS = 24
# The os functions a commit, a pointer update and a deletion go through.
WATCHED = ("pwrite", "write", "fsync", "rename", "replace", "ftruncate", "mkdir", "unlink", "rmdir")


def state_for(step: int) -> dict:
    return {"model": {"w": torch.full((128, 256), float(step)), "b": torch.arange(2048) * step},
            "optimizer": {"state": {0: {"m": torch.full((128, 256), -float(step))}}, "param_groups": [{"lr": 0.1}]},
            "loop": {"step": step}}


def kill_before_call(kill_at: int) -> None:
    """SIGKILLs this process just before its ``kill_at``-th call of a :data:`WATCHED` function."""
    counter, lock = itertools.count(1), threading.Lock()

    def watch(real):
        def call(*args, **kwargs):
            with lock:
                n = next(counter)
            if n == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call

    for name in WATCHED:
        setattr(os, name, watch(getattr(os, name)))


def save_forever(root: str, kill_at: int) -> None:
    """The child: resumes the step count from disk and saves (asynchronously) until it kills itself."""
    torch.set_num_threads(1)
    mgr = CheckpointManager(root, keep_last=2)
    latest = mgr.latest("training")
    step = mgr.describe("training", latest)["step"] + 1 if latest else 1
    kill_before_call(kill_at)
    while True:
        mgr.save_training_checkpoint(state_for(step), step)
        step += 1


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_partial_checkpoint(tmp_path: Path):
    root = tmp_path / "ckpt"
    tier = root / "training"
    rng = random.Random(1234)
    fork = multiprocessing.get_context("fork")
    digests: dict[str, dict] = {}  # name -> manifest files, first time it was seen committed
    killed_mid_save = 0
    for _ in range(KILLS):
        child = fork.Process(target=save_forever, args=(str(root), rng.randint(1, 150)), daemon=True)
        child.start()
        child.join(120)
        assert child.exitcode == -signal.SIGKILL

        leftovers = [p.name for p in tier.iterdir() if p.name.startswith(".")] if tier.exists() else []
        killed_mid_save += any(name.startswith(".tmp-") for name in leftovers)
        committed, rejected = scan_tier(tier)
        assert rejected == [], "a visible directory without a valid manifest"
        names = [name for name, _ in committed]
        with CheckpointManager(root) as mgr:  # also removes the leftovers
            assert mgr.list("training") == names
            assert not any(p.name.startswith(".tmp-") for p in tier.iterdir())
            for name in names:
                mgr.verify("training", name)
                files = read_manifest(tier / name)["files"]
                assert digests.setdefault(name, files) == files, f"{name} changed after its commit"
            if len(digests) >= 2:
                assert len(names) >= 2, "retention left fewer than two checkpoints"
            pointer = read_pointer(tier, "latest")
            assert pointer is None or pointer["name"] in names
            if names:
                newest = mgr.load_latest_valid()
                assert newest.name == names[-1] and newest.skipped == []
                step = newest.state["loop"]["step"]
                expected = state_for(step)
                assert torch.equal(newest.state["model"]["w"], expected["model"]["w"])
                assert torch.equal(newest.state["optimizer"]["state"][0]["m"], expected["optimizer"]["state"][0]["m"])
    assert len(digests) > KILLS, "the child barely saved: the kills did not hit a busy writer"
    assert killed_mid_save >= 1
