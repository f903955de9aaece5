"""Distributed checkpoints: two CPU processes under torchrun (gloo on loopback) train with DDP,
checkpoint, stop, resume in a new torchrun and finish with the parameters of an uninterrupted
two-process run, bit for bit, each rank with its own RNG state restored."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ml.checkpoint.manager import CheckpointManager
from ml.checkpoint.store import read_manifest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, *args: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [str(TORCHRUN), "--nnodes=1", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def params(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "params.safetensors"))


def check_checkpoint_layout(root: Path, name: str) -> None:
    """One copy of the shared state (rank 0's), and each rank's own RNG and loop state."""
    files = read_manifest(root / "training" / name)["files"]
    assert {"rank-00000.json", "rank-00000.safetensors", "rank-00001.json", "rank-00001.safetensors",
            "model.safetensors", "optimizer.safetensors", "state.json"} <= set(files)
    with CheckpointManager(root, read_only=True) as mgr:
        assert mgr.describe("training", name)["world_size"] == 2
        rank0 = mgr.load_checkpoint("training", name, rank=0)
        rank1 = mgr.load_checkpoint("training", name, rank=1)
    assert not torch.equal(rank0["rng"]["torch"], rank1["rng"]["torch"])
    assert not torch.equal(rank0["generator"], rank1["generator"])
    assert rank0["loop"]["global_step"] == rank1["loop"]["global_step"] == 8
    for key, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][key])


def test_ddp_resume_is_bit_identical_and_restores_each_ranks_rng(tmp_path):
    straight = torchrun(tmp_path / "straight")
    root = tmp_path / "ckpt"
    first = torchrun(tmp_path / "first", "--root", str(root), "--stop-at", "8")
    check_checkpoint_layout(root, "epoch-0001-step-00000008")
    resumed = torchrun(tmp_path / "resumed", "--root", str(root), "--resume")

    assert all(r["finished"] for r in straight + resumed) and not any(r["finished"] for r in first)
    assert [r["resumed_from"] for r in resumed] == ["epoch-0001-step-00000008"] * 2  # mid-epoch 2
    for rank in (0, 1):
        assert resumed[rank]["restored_fingerprint"] == first[rank]["saved_fingerprint"]
    assert first[0]["saved_fingerprint"] != first[1]["saved_fingerprint"]

    expected, got = params(tmp_path / "straight"), params(tmp_path / "resumed")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
