"""The write path: file images and their layout, zstd compression, the copy that overlaps the next
forward/backward, the per-rank files of a distributed checkpoint, and releases made from checkpoints."""

from __future__ import annotations

import hashlib
import json
import random
import socket
import struct
import threading
import zlib

import pytest
import torch

import ml.checkpoint.store as store
import ml.checkpoint.snapshot as snapshot
from ml.checkpoint.manager import CheckpointCorrupt, CheckpointManager
from ml.checkpoint.release import export_release, release_documents, resolve_checkpoint
from ml.checkpoint.store import MANIFEST, encode_manifest, read_manifest
from ml.errors import PipelineError


def state(step: int, n: int = 4) -> dict:
    return {"model": {"w": torch.full((n, 3), float(step)), "b": torch.arange(3, dtype=torch.int64) * step},
            "loop": {"step": step}}


# --- layout ---------------------------------------------------------------------------------------


def expected_digest(checksum: str, raw: bytes) -> str:
    """Each checksum computed here by its own library, not by the code under test."""
    import crc32c

    if checksum == "sha256":
        return hashlib.sha256(raw).hexdigest()
    return f"{crc32c.crc32c(raw):08x}" if checksum == "crc32c" else f"{zlib.crc32(raw):08x}"


@pytest.mark.parametrize("checksum", ["crc32c", "crc32", "sha256"])
def test_a_large_file_starts_its_data_on_a_page_and_plain_safetensors_reads_it(tmp_path, checksum):
    from safetensors.torch import load_file

    big = {"model": {"half": torch.randn(3, 5).half(), "w": torch.randn(1_200_000),
                     "i8": torch.arange(7, dtype=torch.int8), "d": torch.randn(5, dtype=torch.float64)}}
    with CheckpointManager(tmp_path, checksum=checksum) as mgr:
        mgr.save_training_checkpoint(big, 1).result()
        path = mgr.tier_dir("training") / "step-00000001" / "model.safetensors"
        raw = path.read_bytes()
        (header_len,) = struct.unpack_from("<Q", raw)
        assert (8 + header_len) % 4096 == 0 and raw[8 + header_len - 1:8 + header_len] == b" "
        for key, value in load_file(str(path)).items():
            assert torch.equal(value, big["model"][key]), key
        entry = read_manifest(path.parent)["files"]["model.safetensors"]
        assert entry == {"size": len(raw), checksum: expected_digest(checksum, raw)}
        loaded = mgr.load_checkpoint("training", "step-00000001")["model"]
        assert all(torch.equal(loaded[k], v) for k, v in big["model"].items())


def test_non_contiguous_conjugate_and_empty_tensors_are_stored_as_their_values(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    odd = {"t": base.t(), "slice": base[:, 1], "conj": torch.tensor([1 + 2j], dtype=torch.complex64).conj(),
           "empty": torch.zeros(0, 2), "scalar": torch.tensor(True)}
    with CheckpointManager(tmp_path) as mgr:
        mgr.save_training_checkpoint({"odd": odd}, 1).result()
        loaded = mgr.load_checkpoint("training", "step-00000001")["odd"]
    for key, value in odd.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value.resolve_conj()), key


def test_a_tensor_of_a_dtype_safetensors_cannot_hold_fails_naming_its_path(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(TypeError, match="model.q.*complex128"):
            mgr.save_training_checkpoint({"model": {"q": torch.ones(2, dtype=torch.complex128)}}, 1)


# --- compression ----------------------------------------------------------------------------------


def test_zstd_stores_compressed_tensor_files_and_loads_them_bit_identically(tmp_path):
    compressible = {"model": {"zeros": torch.zeros(200_000), "w": torch.randn(1000)}, "loop": {"step": 1}}
    with CheckpointManager(tmp_path, compress="zstd") as mgr:
        stats = mgr.save_training_checkpoint(compressible, 1).result()
        ckpt = mgr.tier_dir("training") / "step-00000001"
        files = read_manifest(ckpt)["files"]
        assert set(files) == {"model.safetensors.zst", "state.json"}
        entry = files["model.safetensors.zst"]
        assert entry["size"] == (ckpt / "model.safetensors.zst").stat().st_size < entry["raw_size"] // 20
        assert stats.compress_s > 0 and stats.bytes_written < 100_000
        loaded = mgr.load_checkpoint("training", "step-00000001")
        assert torch.equal(loaded["model"]["zeros"], compressible["model"]["zeros"])
        assert torch.equal(loaded["model"]["w"], compressible["model"]["w"])
        mgr.save_milestone_checkpoint(compressible, "loss", 1.0, "min", epoch=1, step=1)
        assert (mgr.tier_dir("milestone") / mgr.list("milestone")[0] / "model.safetensors").exists()  # plain


def test_every_change_to_a_compressed_file_is_detected_naming_it(tmp_path):
    with CheckpointManager(tmp_path, compress="zstd") as mgr:
        mgr.save_training_checkpoint(state(1, n=300), 1).result()
        path = mgr.tier_dir("training") / "step-00000001" / "model.safetensors.zst"
        original = path.read_bytes()
        rng = random.Random(0)
        for pos in sorted({0, 4, len(original) - 1, rng.randrange(len(original))}):
            flipped = bytearray(original)
            flipped[pos] ^= 0x10
            path.write_bytes(bytes(flipped))
            for check in (mgr.verify, mgr.load_checkpoint):
                with pytest.raises(CheckpointCorrupt, match="model.safetensors.zst: CRC-32C differs"):
                    check("training", "step-00000001")
        path.write_bytes(original[:-5])
        with pytest.raises(CheckpointCorrupt, match=r"model.safetensors.zst: size .*\(truncated"):
            mgr.load_checkpoint("training", "step-00000001")
        path.write_bytes(original)
        assert mgr.load_checkpoint("training", "step-00000001")["loop"]["step"] == 1


@pytest.mark.parametrize(("payload", "raw_size", "message"), [
    (b"not zstd at all", 10, "cannot be decompressed"),
    (None, 3, "frame declares 1000 bytes, 3 in the manifest"),  # refused before decompressing
])
def test_a_forged_compressed_file_with_a_valid_digest_is_refused(tmp_path, payload, raw_size, message):
    import zstandard

    data = payload if payload is not None else zstandard.ZstdCompressor().compress(b"x" * 1000)
    ckpt = tmp_path / "training" / "step-00000009"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors.zst").write_bytes(data)
    (ckpt / "state.json").write_bytes(b"{}")
    body = {"format": 1, "name": ckpt.name, "created_ns": 1, "meta": {}, "files": {
        "model.safetensors.zst": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "raw_size": raw_size},
        "state.json": {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}}}
    (ckpt / MANIFEST).write_bytes(encode_manifest(body))
    with CheckpointManager(tmp_path, read_only=True) as mgr:
        with pytest.raises(CheckpointCorrupt, match=f"model.safetensors.zst: {message}"):
            mgr.load_checkpoint("training", "step-00000009")


def test_a_compressed_entry_without_raw_size_or_listed_twice_is_refused(tmp_path):
    for files in ({"a.safetensors.zst": {"size": 1, "sha256": "0" * 64}},
                  {"a.safetensors.zst": {"size": 1, "sha256": "0" * 64, "raw_size": 1},
                   "a.safetensors": {"size": 1, "sha256": "0" * 64}}):
        raw = encode_manifest({"format": 1, "name": "x", "created_ns": 1, "meta": {}, "files": files})
        with pytest.raises(CheckpointCorrupt, match="raw_size|twice"):
            store.decode_manifest(raw, tmp_path / "x" / MANIFEST)


@pytest.mark.parametrize(("checksum", "label"), [("crc32c", "CRC-32C"), ("crc32", "CRC-32")])
def test_crc_checksums_catch_every_flipped_bit_and_truncation_of_the_training_tier(tmp_path, checksum, label):
    with CheckpointManager(tmp_path, checksum=checksum) as mgr:
        mgr.save_training_checkpoint(state(1, n=20), 1).result()
        ckpt = mgr.tier_dir("training") / "step-00000001"
        assert all(set(entry) == {"size", checksum} for entry in read_manifest(ckpt)["files"].values())
        for name in ("model.safetensors", "state.json"):
            path = ckpt / name
            original = path.read_bytes()
            for pos in range(len(original)):
                for bit in range(8):
                    flipped = bytearray(original)
                    flipped[pos] ^= 1 << bit
                    path.write_bytes(bytes(flipped))
                    with pytest.raises(CheckpointCorrupt, match=f"{name}: {label} differs"):
                        mgr.verify("training", "step-00000001")
            for cut in (0, 1, len(original) // 2, len(original) - 1):
                path.write_bytes(original[:cut])
                with pytest.raises(CheckpointCorrupt, match=f"{name}: size {cut} != {len(original)}"):
                    mgr.load_checkpoint("training", "step-00000001")
            path.write_bytes(original)
        assert mgr.load_checkpoint("training", "step-00000001")["loop"]["step"] == 1
        mgr.save_milestone_checkpoint(state(1), "loss", 1.0, "min", epoch=1, step=1)
        milestone = mgr.tier_dir("milestone") / mgr.list("milestone")[0]
        assert all("sha256" in entry for entry in read_manifest(milestone)["files"].values())


def test_an_entry_with_two_checksums_or_an_unknown_one_is_malformed(tmp_path):
    for entry in ({"size": 1, "sha256": "0" * 64, "crc32": "0" * 8}, {"size": 1, "md5": "0" * 32},
                  {"size": 1, "crc32": "0" * 64}):
        raw = encode_manifest({"format": 1, "name": "x", "created_ns": 1, "meta": {}, "files": {"a.json": entry}})
        with pytest.raises(CheckpointCorrupt, match="malformed entry for 'a.json'"):
            store.decode_manifest(raw, tmp_path / "x" / MANIFEST)
    with pytest.raises(ValueError, match="checksum must be one of sha256, crc32c, crc32"):
        CheckpointManager(tmp_path, checksum="md5")


def test_unknown_compression_is_refused():
    with pytest.raises(ValueError, match="compress must be one of none, zstd"):
        CheckpointManager("unused", compress="gzip")


# --- the copy that overlaps the next forward/backward ---------------------------------------------


def test_the_optimizer_step_waits_for_the_background_copy_and_the_checkpoint_holds_the_old_values(tmp_path,
                                                                                                    monkeypatch):
    release = threading.Event()
    real_complete = snapshot.Snapshot.complete

    def held_complete(self):
        release.wait(30)
        real_complete(self)

    monkeypatch.setattr(snapshot.Snapshot, "complete", held_complete)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.ones(1, 3)).sum().backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with CheckpointManager(tmp_path) as mgr:
        future = mgr.save_training_checkpoint({"model": model.state_dict()}, 1, optimizer=optimizer)
        assert not future.done()
        stepper = threading.Thread(target=optimizer.step)
        stepper.start()
        stepper.join(0.3)
        assert stepper.is_alive(), "optimizer.step() ran while the copy was pending"
        release.set()
        stepper.join(30)
        stats = future.result()
        assert not torch.equal(model.weight, before["weight"])  # the step happened after the copy
        saved = mgr.load_checkpoint("training", "step-00000001")["model"]
    assert all(torch.equal(saved[k], v) for k, v in before.items())
    assert stats.step_wait_s > 0 and stats.blocking_s >= stats.step_wait_s


def test_without_an_optimizer_every_tensor_is_copied_before_the_call_returns(tmp_path, monkeypatch):
    release = threading.Event()
    real_commit = store.commit_checkpoint
    monkeypatch.setattr("ml.checkpoint.manager.commit_checkpoint",
                        lambda *a, **k: (release.wait(30), real_commit(*a, **k))[1])
    live = {"model": {"w": torch.zeros(5)}}
    with CheckpointManager(tmp_path) as mgr:
        future = mgr.save_training_checkpoint(live, 1)
        live["model"]["w"].add_(1.0)  # the caller changes the tensor while the write is pending
        release.set()
        future.result()
        assert torch.equal(mgr.load_checkpoint("training", "step-00000001")["model"]["w"], torch.zeros(5))


def test_stats_say_where_the_time_went(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        stats = mgr.save_training_checkpoint(state(1, n=100_000), 1).result()
    assert stats.checksum_s > 0 and stats.write_s > 0 and stats.fsync_s > 0 and stats.copy_s > 0
    assert stats.durable_s > 0 and stats.upload_s == 0 and stats.compress_s == 0


# --- distributed, as one rank -----------------------------------------------------------------------


@pytest.fixture
def process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_distributed_checkpoint_keeps_each_ranks_state_in_its_own_files(tmp_path, process_group):
    saved = {**state(3), "rng": {"torch": torch.arange(5, dtype=torch.uint8), "seed": 7}, "generator": torch.ones(2)}
    with CheckpointManager(tmp_path, distributed=True) as mgr:
        assert mgr.is_distributed and mgr.rank == 0 and mgr.world_size == 1
        mgr.save_training_checkpoint(saved, 3).result()
        loaded = mgr.load_latest_valid()
    files = read_manifest(tmp_path / "training" / "step-00000003")["files"]
    assert {"rank-00000.json", "rank-00000.safetensors", "model.safetensors", "state.json"} == set(files)
    assert json.loads((tmp_path / "training" / "step-00000003" / "state.json").read_text()).keys() == {"model"}
    assert loaded.state["rng"]["seed"] == 7 and torch.equal(loaded.state["rng"]["torch"], saved["rng"]["torch"])
    assert torch.equal(loaded.state["generator"], torch.ones(2)) and loaded.state["loop"] == {"step": 3}
    with CheckpointManager(tmp_path, read_only=True) as reader:
        with pytest.raises(CheckpointCorrupt, match="saved by 1 ranks; rank 1 has no state"):
            reader.load_checkpoint("training", "step-00000003", rank=1)


# --- releases ---------------------------------------------------------------------------------------


def test_release_documents_take_spec_dataset_and_metrics_from_the_checkpoint():
    now = __import__("datetime").datetime(2026, 1, 2, 3, 4, 5, tzinfo=__import__("datetime").timezone.utc)
    ckpt_state = {"model": {"w": torch.zeros(2, 3)}, "loop": {"global_step": 40, "epoch": 2},
                  "extra": {"model_spec": {"in_features": 3}, "classes": ["a", "b"], "dataset": {"md5": "d41d"},
                            "metrics": {"val_accuracy": 0.9}, "run_id": "r1", "git_commit": "abc", "config": {"lr": 1}}}
    weights, config, card = release_documents(ckpt_state, {"metric": "val_loss", "value": 0.2, "step": 40, "epoch": 2},
                                              tier="milestone", name="m1", version="1.0.0", description="d",
                                              intended_use="u", limitations="l", now=now)
    assert weights.keys() == {"w"}
    assert config == {"model_spec": {"in_features": 3}, "classes": ["a", "b"], "training": {"lr": 1},
                      "tensors": {"w": {"dtype": "float32", "shape": [2, 3]}}}
    assert card["dataset"] == {"md5": "d41d"} and card["metrics"] == {"val_accuracy": 0.9, "val_loss": 0.2}
    assert card["source"] == {"tier": "milestone", "checkpoint": "m1", "step": 40, "epoch": 2, "run_id": "r1",
                              "git_commit": "abc"}
    assert card["created_at"] == "2026-01-02T03:04:05+00:00" and card["limitations"] == "l"
    with pytest.raises(PipelineError, match="training/x: expected model weights"):
        release_documents({"loop": {}}, {}, tier="training", name="x", version="1.0.0", description="",
                          intended_use="", limitations="")


def test_references_resolve_to_committed_checkpoints(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        for step in (1, 2):
            mgr.save_training_checkpoint(state(step), step).result()
        mgr.save_milestone_checkpoint(state(1), "val_loss", 0.5, "min", epoch=1, step=1)
        assert resolve_checkpoint(mgr, "training", "latest") == "step-00000002"
        assert resolve_checkpoint(mgr, "training", "step-00000001") == "step-00000001"
        assert resolve_checkpoint(mgr, "milestone", "best_val_loss") == "val_loss-epoch-0001-step-00000001"
        for tier, ref in (("training", "step-00000009"), ("milestone", "best_accuracy"), ("training", "../x")):
            with pytest.raises(PipelineError, match=f"{tier}/.*no such committed checkpoint"):
                resolve_checkpoint(mgr, tier, ref)
        name, _ = export_release(mgr, "training", "latest", version="2.0.0", description="d", intended_use="u",
                                 limitations="l")
        assert name == "step-00000002"
        release = mgr.load_production("2.0.0")
        assert torch.equal(release.weights["w"], state(2)["model"]["w"])
        assert release.model_card["source"]["checkpoint"] == "step-00000002"


def test_prune_keeps_every_pointer_target_in_the_milestone_tier(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save_milestone_checkpoint(state(1), "acc", 0.5, "max", epoch=1, step=1)
        mgr.save_milestone_checkpoint(state(2), "loss", 0.5, "min", epoch=2, step=2)
        mgr.save_milestone_checkpoint(state(3), "loss", 0.4, "min", epoch=3, step=3)
        assert mgr.prune("milestone", 0) == ["loss-epoch-0002-step-00000002"]
        assert mgr.list("milestone") == ["acc-epoch-0001-step-00000001", "loss-epoch-0003-step-00000003"]
