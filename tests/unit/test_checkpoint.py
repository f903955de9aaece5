"""Checkpointing: the decisions, the on-disk format, the three tiers, and an exact resume."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ml.checkpoint.manager as checkpoint
from ml.checkpoint.manager import (
    CheckpointCorrupt,
    CheckpointExists,
    CheckpointLocked,
    CheckpointManager,
    InvalidVersion,
)
from ml.checkpoint.state import capture_rng_state, restore_rng_state
from ml.checkpoint.store import encode_manifest, write_pointer
from ml.errors import PipelineError
from ml.train.checkpoints import CheckpointHook
from ml.train.loop import LoopState

REPO = Path(__file__).resolve().parents[2]


def small_state(step: int) -> dict:
    return {"model": {"w": torch.full((4, 3), float(step)), "b": torch.arange(3, dtype=torch.int64) * step},
            "loop": {"step": step, "history": [{"loss": 0.5}]}}


@pytest.fixture
def manager(tmp_path):
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        yield mgr


# --- format -------------------------------------------------------------------------------------


def test_round_trip_keeps_types_keys_and_bits(manager):
    state = {
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5)}},
                      "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3, "foreach": None}]},
        "odd": {"__tensor__": "not a ref", (1, 2): "tuple key", "nan": math.nan, "big": 2**70, "flag": True},
        "dtypes": {str(dt): torch.arange(6).to(dt).reshape(2, 3) for dt in
                   (torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.bool)},
        "empty": torch.zeros(0, 3),
        "top": torch.tensor(7),
    }
    manager.save_training_checkpoint(state, 1).result()
    loaded = manager.load_checkpoint("training", "step-00000001")
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert loaded["odd"]["__tensor__"] == "not a ref" and loaded["odd"][(1, 2)] == "tuple key"
    assert math.isnan(loaded["odd"]["nan"]) and loaded["odd"]["big"] == 2**70 and loaded["odd"]["flag"] is True
    for key, tensor in state["dtypes"].items():
        assert loaded["dtypes"][key].dtype == tensor.dtype and torch.equal(loaded["dtypes"][key], tensor)
    assert loaded["empty"].shape == (0, 3) and torch.equal(loaded["top"], torch.tensor(7))


def test_unstorable_leaf_fails_at_the_call_naming_its_path(manager):
    with pytest.raises(TypeError, match="model.fn"):
        manager.save_training_checkpoint({"model": {"fn": print}}, 1)
    assert manager.list("training") == []


def test_snapshot_reuses_host_buffers_between_saves(manager):
    manager.save_training_checkpoint(small_state(1), 1).result()
    first = {k: v.tensor.data_ptr() for k, v in manager._buffers.items()}
    manager.save_training_checkpoint(small_state(2), 2).result()
    assert {k: v.tensor.data_ptr() for k, v in manager._buffers.items()} == first


# --- training tier: retention, pointer, async ---------------------------------------------------


def test_retention_keeps_last_n_and_moves_the_pointer(tmp_path):
    with CheckpointManager(tmp_path, keep_last=3) as mgr:
        for step in range(1, 7):
            mgr.save_training_checkpoint(small_state(step), step)
            mgr.wait()
            assert mgr.latest("training") == f"step-{step:08d}"
            assert json.loads((tmp_path / "training" / "latest").read_text())["name"] == f"step-{step:08d}"
        assert mgr.list("training") == ["step-00000004", "step-00000005", "step-00000006"]
        assert torch.equal(mgr.load_checkpoint("training", "step-00000006")["model"]["w"], torch.full((4, 3), 6.0))


def test_keep_last_below_two_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=1)


def test_prune_never_deletes_the_pointer_target(tmp_path):
    with CheckpointManager(tmp_path, keep_last=3) as mgr:
        for step in (1, 2, 3):
            mgr.save_training_checkpoint(small_state(step), step).result()
        write_pointer(mgr.tier_dir("training"), "latest", {"name": "step-00000001"})
        assert mgr.prune("training", keep=1) == ["step-00000002"]
        assert mgr.list("training") == ["step-00000001", "step-00000003"]


def test_dangling_or_garbled_pointer_falls_back_to_newest_committed(manager):
    for step in (1, 2):
        manager.save_training_checkpoint(small_state(step), step).result()
    pointer = manager.tier_dir("training") / "latest"
    pointer.write_text('{"name": "step-00000099"}')
    assert manager.latest("training") == "step-00000002"
    pointer.write_text("{garbage")
    assert manager.latest("training") == "step-00000002"
    assert manager.load_latest_valid().name == "step-00000002"


def test_saving_the_same_step_again_replaces_it(manager):
    manager.save_training_checkpoint(small_state(1), 5).result()
    manager.save_training_checkpoint(small_state(2), 5).result()
    assert manager.list("training") == ["step-00000005"]
    assert torch.equal(manager.load_checkpoint("training", "step-00000005")["model"]["w"], torch.full((4, 3), 2.0))


def test_stats_reach_the_callback(tmp_path):
    seen = []
    with CheckpointManager(tmp_path, on_saved=seen.append) as mgr:
        stats = mgr.save_training_checkpoint(small_state(1), 1).result()
    assert seen == [stats]
    assert stats.tier == "training" and stats.name == "step-00000001" and stats.step == 1
    assert stats.bytes_written == sum(f.stat().st_size for f in (tmp_path / "training" / stats.name).iterdir())
    assert stats.blocking_s >= 0 and stats.background_s > 0


def test_one_save_in_flight_the_next_one_waits(tmp_path, monkeypatch):
    release, writing = threading.Event(), threading.Event()
    real_commit = checkpoint.commit_checkpoint

    def held_commit(*args, **kwargs):  # the first commit is held until the test releases it
        writing.set()
        assert release.wait(30)
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "commit_checkpoint", held_commit)
    second: list = []
    with CheckpointManager(tmp_path) as mgr:
        first = mgr.save_training_checkpoint(small_state(1), 1)
        assert writing.wait(30) and not first.done()  # the call returned while the write goes on
        caller = threading.Thread(target=lambda: second.append(mgr.save_training_checkpoint(small_state(2), 2)))
        caller.start()
        caller.join(0.3)
        assert caller.is_alive() and not second, "the second save did not wait for the first"
        release.set()
        caller.join(30)
        assert first.done() and first.result().name == "step-00000001"
        stats = second[0].result()
    assert stats.waited_s > 0 and stats.name == "step-00000002"
    assert mgr.list("training") == ["step-00000001", "step-00000002"]
    assert CheckpointManager(tmp_path, read_only=True).list("training") == ["step-00000001", "step-00000002"]


def test_background_failure_is_raised_by_the_next_save_and_by_close(tmp_path, monkeypatch):
    def failing_commit(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "commit_checkpoint", failing_commit)
    mgr = CheckpointManager(tmp_path)
    mgr.save_training_checkpoint(small_state(1), 1)  # returns: the failure happens in the background
    with pytest.raises(OSError, match="disk full"):
        mgr.save_training_checkpoint(small_state(2), 2)
    mgr.save_training_checkpoint(small_state(3), 3)
    with pytest.raises(OSError, match="disk full"):
        mgr.close()
    assert mgr.wait() is None  # each failure is raised once
    assert mgr.list("training") == []


def test_leftover_temporaries_are_removed_at_start(tmp_path):
    tier = tmp_path / "training"
    (tier / ".tmp-step-00000003-abcd1234").mkdir(parents=True)
    (tier / ".tmp-step-00000003-abcd1234" / "model.safetensors").write_bytes(b"half")
    (tier / ".latest.xyz.tmp").write_text("{")
    (tier / "not-committed").mkdir()  # visible but without a manifest: left alone, never listed
    with CheckpointManager(tmp_path) as mgr:
        assert sorted(p.name for p in tier.iterdir()) == ["not-committed"]
        assert mgr.list("training") == []
    with CheckpointManager(tmp_path, read_only=True) as mgr:
        with pytest.raises(CheckpointCorrupt, match="not-committed"):
            mgr.load_latest_valid()


def test_second_writer_on_the_same_root_is_refused(tmp_path):
    with CheckpointManager(tmp_path):
        with pytest.raises(CheckpointLocked):
            CheckpointManager(tmp_path)
        assert CheckpointManager(tmp_path, read_only=True).list("training") == []
    CheckpointManager(tmp_path).close()


# --- corruption and safe loading ------------------------------------------------------------------


def committed_files(mgr: CheckpointManager, name: str) -> list[Path]:
    return sorted((mgr.tier_dir("training") / name).iterdir())


def test_every_truncation_and_flipped_byte_is_detected_naming_the_file(manager):
    manager.save_training_checkpoint(small_state(1), 1).result()
    rng = random.Random(0)
    for path in committed_files(manager, "step-00000001"):
        original = path.read_bytes()
        positions = {0, len(original) - 1, rng.randrange(len(original))}
        if path.name == "manifest.json":  # its own digest covers it: every byte position
            positions = set(range(len(original)))
        for pos in sorted(positions):
            flipped = bytearray(original)
            flipped[pos] ^= 0x01
            path.write_bytes(bytes(flipped))
            with pytest.raises(CheckpointCorrupt, match=path.name):
                manager.verify("training", "step-00000001")
            with pytest.raises(CheckpointCorrupt, match=path.name):
                manager.load_checkpoint("training", "step-00000001")
        path.write_bytes(original[:-1])
        with pytest.raises(CheckpointCorrupt, match=f"{path.name}.*(truncated|readable)"):
            manager.verify("training", "step-00000001")
        path.write_bytes(original)
        manager.verify("training", "step-00000001")


def test_missing_file_is_detected(manager):
    manager.save_training_checkpoint(small_state(1), 1).result()
    (manager.tier_dir("training") / "step-00000001" / "model.safetensors").unlink()
    with pytest.raises(CheckpointCorrupt, match="model.safetensors: missing"):
        manager.verify("training", "step-00000001")


@pytest.mark.parametrize("victim", ["model.safetensors", "state.json", "manifest.json"])
def test_resume_falls_back_to_the_previous_valid_checkpoint(manager, victim):
    for step in (1, 2):
        manager.save_training_checkpoint(small_state(step), step).result()
    path = manager.tier_dir("training") / "step-00000002" / victim
    path.write_bytes(path.read_bytes()[:-3])
    loaded = manager.load_latest_valid()
    assert loaded.name == "step-00000001"
    assert loaded.state["loop"]["step"] == 1
    assert [name for name, _ in loaded.skipped] == ["step-00000002"]
    assert victim in loaded.skipped[0][1]


def test_no_valid_checkpoint_is_an_error_not_a_fresh_start(manager):
    manager.save_training_checkpoint(small_state(1), 1).result()
    path = manager.tier_dir("training") / "step-00000001" / "model.safetensors"
    path.write_bytes(b"\0" * path.stat().st_size)
    with pytest.raises(CheckpointCorrupt, match="no valid checkpoint") as err:
        manager.load_latest_valid()
    assert isinstance(err.value, PipelineError)


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def forge_checkpoint(tier: Path, name: str, files: dict[str, bytes]) -> None:
    import hashlib

    (tier / name).mkdir(parents=True)
    for fname, data in files.items():
        (tier / name / fname).write_bytes(data)
    body = {"format": 1, "name": name, "created_ns": time.time_ns(), "meta": {"step": 99},
            "files": {f: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for f, d in files.items()}}
    (tier / name / "manifest.json").write_bytes(encode_manifest(body))


@pytest.mark.parametrize("fname", ["model.safetensors", "model.pt"])
def test_a_pickle_in_a_checkpoint_is_refused_without_running_it(manager, tmp_path, fname):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(RunsCode(probe))).close()
    assert probe.exists()  # the payload does run code when unpickled
    marker = tmp_path / "marker"
    forge_checkpoint(manager.tier_dir("training"), "step-00000099", {fname: pickle.dumps(RunsCode(marker))})
    with pytest.raises(CheckpointCorrupt, match=fname.replace(".", r"\.")):
        manager.load_checkpoint("training", "step-00000099")
    with pytest.raises(CheckpointCorrupt, match="no valid checkpoint"):
        manager.load_latest_valid()
    assert not marker.exists()


def test_a_forged_pickle_is_skipped_on_resume(manager, tmp_path):
    manager.save_training_checkpoint(small_state(1), 1).result()
    marker = tmp_path / "marker"
    forge_checkpoint(manager.tier_dir("training"), "step-00000099",
                     {"model.safetensors": pickle.dumps(RunsCode(marker)), "state.json": b"{}"})
    loaded = manager.load_latest_valid()
    assert loaded.name == "step-00000001" and loaded.skipped[0][0] == "step-00000099"
    assert not marker.exists()


# --- milestone tier -----------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "values", "saved"), [
    ("min", [0.9, 0.7, 0.8, 0.7, 0.5], [0.9, 0.7, 0.5]),
    ("max", [0.1, 0.3, 0.2, 0.3, 0.6], [0.1, 0.3, 0.6]),
])
def test_milestones_are_saved_only_on_improvement(manager, mode, values, saved):
    for step, value in enumerate(values, start=1):
        stats = manager.save_milestone_checkpoint(small_state(step), "val_metric", value, mode, epoch=step,
                                                  step=step * 10, run_id="run-1", notes=f"n{step}")
        assert (stats is not None) == (value in saved and values.index(value) == step - 1)
    names = manager.list("milestone")
    assert [manager.describe("milestone", n)["value"] for n in names] == saved
    best = names[-1]
    assert json.loads((manager.tier_dir("milestone") / "best_val_metric").read_text())["name"] == best
    sidecar = json.loads((manager.tier_dir("milestone") / best / "milestone.json").read_text())
    assert sidecar == {"metric": "val_metric", "value": saved[-1], "mode": mode, "epoch": len(values),
                       "step": len(values) * 10, "run_id": "run-1", "notes": f"n{len(values)}"}
    assert manager.load_checkpoint("milestone", best)["loop"]["step"] == len(values)
    assert manager.best("val_metric") == (best, saved[-1], mode)


def test_milestones_are_not_pruned_and_metrics_are_independent(manager):
    for step in range(1, 6):
        manager.save_milestone_checkpoint(small_state(step), "loss", 1.0 / step, "min", epoch=step, step=step)
    manager.save_milestone_checkpoint(small_state(9), "accuracy", 0.1, "max", epoch=9, step=9)
    manager.save_training_checkpoint(small_state(1), 1).result()
    assert len(manager.list("milestone")) == 6
    with pytest.raises(ValueError, match="mode"):
        manager.save_milestone_checkpoint(small_state(1), "loss", 0.01, "max", epoch=1, step=1)


# --- production tier ----------------------------------------------------------------------------


def test_production_round_trip_pointer_and_no_overwrite(manager):
    weights = {"net.0.weight": torch.randn(3, 2), "net.0.bias": torch.randn(3)}
    manager.save_production_checkpoint(weights, "1.0.0", {"hidden": [8]}, {"owner": "team"})
    manager.save_production_checkpoint(weights, "1.1.0-rc.1", {"hidden": [8]}, {"owner": "team"})
    assert manager.latest("production") == "1.1.0-rc.1"
    with pytest.raises(CheckpointExists, match="1.0.0"):
        manager.save_production_checkpoint({"x": torch.zeros(1)}, "1.0.0", {}, {})
    prod = manager.load_production("1.0.0")
    assert prod.config == {"hidden": [8]} and prod.model_card == {"owner": "team"}
    assert prod.weights.keys() == weights.keys()
    assert all(torch.equal(prod.weights[k], weights[k]) for k in weights)
    files = sorted(p.name for p in (manager.tier_dir("production") / "1.0.0").iterdir())
    assert files == ["config.json", "manifest.json", "model.safetensors", "model_card.json"]


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "../1.0.0", "latest"])
def test_production_refuses_a_non_semver_version(manager, version):
    with pytest.raises(InvalidVersion, match="semantic version"):
        manager.save_production_checkpoint({"x": torch.zeros(1)}, version, {}, {})
    assert manager.list("production") == []


def test_production_refuses_non_tensor_weights(manager):
    with pytest.raises(TypeError, match="Tensor"):
        manager.save_production_checkpoint({"x": [1, 2]}, "1.0.0", {}, {})


# --- exact resume -------------------------------------------------------------------------------


def test_rng_state_round_trips_through_a_checkpoint(manager):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    manager.save_training_checkpoint({"rng": capture_rng_state()}, 1).result()
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(manager.load_checkpoint("training", "step-00000001")["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    assert got[:2] == expected[:2]
    assert np.array_equal(got[2], expected[2]) and torch.equal(got[3], expected[3])


def test_hook_saves_every_n_steps_every_t_seconds_and_at_epoch_end(tmp_path):
    now, saved = [0.0], []
    model = torch.nn.Linear(2, 2)
    with CheckpointManager(tmp_path, on_saved=lambda stats: saved.append(stats.name)) as mgr:
        hook = CheckpointHook(mgr, model, torch.optim.SGD(model.parameters(), lr=0.1), generator=torch.Generator(),
                              every_steps=3, every_seconds=10.0, clock=lambda: now[0])
        state = LoopState()
        for step in range(1, 8):
            state.global_step = step
            now[0] = 10.0 if step >= 5 else 0.0
            hook.on_step_end(state, 0.0)
        state.epoch = 1
        hook.on_epoch_end(state, {})
    # 3 and 6 by steps, 5 by time (10 s after the start), then the end of the epoch
    assert saved == ["epoch-0000-step-00000003", "epoch-0000-step-00000005", "epoch-0000-step-00000006",
                     "epoch-0001-step-00000007"]


RESUME_SCRIPT = r'''
import json, sys
import torch
from ml.checkpoint.manager import CheckpointManager
from ml.train.checkpoints import CheckpointHook, resume as resume_from_checkpoints
from ml.train.loop import Callback, fit, seed_everything
from ml.model.architectures import MLP, ModelSpec

EPOCHS, BATCH, N = 3, 16, 100   # 7 batches per epoch, 21 steps


class Interrupted(Exception):
    pass


class Recorder(Callback):
    def __init__(self, scheduler):
        self.losses, self.scheduler = [], scheduler

    def on_step_end(self, state, step):
        self.losses.append(step.loss.item())
        self.scheduler.step()  # so the scheduler's state matters to the resume


class CrashAt(Callback):
    def __init__(self, manager, step=None, epoch=None):
        self.manager, self.step, self.epoch = manager, step, epoch

    def on_step_end(self, state, loss):
        if state.global_step == self.step:
            self.manager.wait()
            raise Interrupted

    def on_epoch_end(self, state, metrics):
        if state.epoch == self.epoch:
            self.manager.wait()
            raise Interrupted


def run(root=None, crash_step=None, crash_epoch=None, resume=False, compress="none"):
    generator = seed_everything(0)
    data = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 6, generator=data), torch.randint(0, 3, (N,), generator=data)
    model = MLP(ModelSpec(6, (16,), 3, 0.3))
    model.set_input_stats(x.numpy())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    recorder = Recorder(scheduler)
    hooks, state, manager, resumed_from = [recorder], None, None, None
    if root is not None:
        manager = CheckpointManager(root, compress=compress)
        if resume:
            result = resume_from_checkpoints(manager, model, optimizer, generator=generator, scheduler=scheduler)
            state, resumed_from = result.state, result.name
        hooks += [CheckpointHook(manager, model, optimizer, generator=generator, scheduler=scheduler, every_steps=4),
                  CrashAt(manager, crash_step, crash_epoch)]
    try:
        state = fit(model, optimizer, (x, y), (x[:30], y[:30]), epochs=EPOCHS, batch_size=BATCH,
                    generator=generator, hooks=hooks, state=state)
    except Interrupted:
        pass
    finally:
        if manager is not None:
            manager.close()
    return {"losses": recorder.losses, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "history": state.history if state else None,
            "resumed_from": resumed_from}


if __name__ == "__main__":
    root, out = sys.argv[1], sys.argv[2]
    torch.save(run(root, resume=True), out)
'''


@pytest.fixture(scope="module")
def resume_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "resume_script.py"
    path.write_text(RESUME_SCRIPT)
    spec = importlib.util.spec_from_file_location("resume_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


@pytest.fixture(scope="module")
def straight_run(resume_script):
    return resume_script[1].run()


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize(("crash", "expected_checkpoint", "steps_before"), [
    ({"crash_epoch": 1}, "epoch-0001-step-00000007", 7),  # at an epoch boundary
    ({"crash_step": 12}, "epoch-0001-step-00000012", 12),  # mid-epoch: batch 5 of 7 of epoch 2
    ({"crash_step": 12, "compress": "zstd"}, "epoch-0001-step-00000012", 12),  # resumed without compression
])
def test_resumed_run_is_bit_identical_to_the_uninterrupted_one(resume_script, straight_run, tmp_path,
                                                                 crash, expected_checkpoint, steps_before):
    path, module = resume_script
    root = tmp_path / "ckpt"
    interrupted = module.run(root, **crash)
    assert len(interrupted["losses"]) == steps_before
    out = tmp_path / "resumed.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(path), str(root), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    resumed = torch.load(out, weights_only=True)
    assert resumed["resumed_from"] == expected_checkpoint
    assert len(straight_run["losses"]) == 21
    assert interrupted["losses"] + resumed["losses"] == straight_run["losses"]
    for key in ("model", "optimizer", "scheduler", "history"):
        assert_same(resumed[key], straight_run[key], key)


class _FakeStream:
    """A CUDA stream stand-in that counts the events it was made to wait on."""

    def __init__(self, name):
        self.name, self.waits = name, []

    def wait_event(self, event):
        self.waits.append(event)


def test_a_snapshot_orders_each_stream_after_its_side_copies_once(monkeypatch):
    """guard() runs before every optimizer.step() while a save is in flight: each stream waits on
    the side-stream copies' event the first time, not at every step (a wait_event per step and
    tensor cost a GPU run 0.07-0.10 s a checkpoint); a stream that became current later waits too."""
    from ml.checkpoint.snapshot import Snapshot

    main, other = _FakeStream("main"), _FakeStream("other")
    current = {"stream": main}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["stream"])
    event = object()
    snapshot = Snapshot(b"{}", {}, [], [], [(torch.device("cuda", 0), event)], 0.0)
    assert snapshot.has_deferred
    for _ in range(50):
        snapshot.guard()
    assert main.waits == [event]
    current["stream"] = other
    snapshot.guard()
    snapshot.guard()
    assert other.waits == [event] and main.waits == [event]
