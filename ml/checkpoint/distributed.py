"""Checkpoints under ``torch.distributed``: rank 0 writes the shared state (model, optimizer) once,
and every rank's own state (its RNGs, its loop position) travels to rank 0 as bytes and goes into
the same atomic checkpoint as ``rank-<r>.json`` + ``rank-<r>.safetensors``. Collectives carry
tensors of bytes and JSON, never pickles.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ml.checkpoint.snapshot import snapshot_state

__all__ = ["RANK_LOCAL_KEYS", "Dist", "all_ok", "broadcast_json", "detect_distributed", "gather_bytes",
           "gather_rank_states", "pack_rank_state", "rank_files", "unpack_rank_state"]

# The keys of a training state that differ between ranks.
RANK_LOCAL_KEYS = ("rng", "generator", "loop")


def rank_files(rank: int) -> tuple[str, str]:
    """The JSON tree and the tensors of one rank's own state in a distributed checkpoint."""
    return f"rank-{rank:05d}.json", f"rank-{rank:05d}.safetensors"


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group."""

    rank: int
    world_size: int
    device: torch.device  # where the tensors of collectives live (CUDA for NCCL)


def detect_distributed(flag: bool | None) -> Dist | None:
    if flag is False:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if flag:
            raise RuntimeError("distributed=True needs an initialized torch.distributed process group")
        return None
    if dist.get_world_size() == 1 and not flag:
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def gather_bytes(ctx: Dist, blob: bytes) -> list[bytes] | None:
    """Every rank's ``blob`` on rank 0 (None elsewhere), as tensors: nothing is pickled."""
    import torch.distributed as dist

    size = torch.tensor([len(blob)], dtype=torch.int64, device=ctx.device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8)
    padded[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    padded = padded.to(ctx.device)
    gathered = [torch.empty_like(padded) for _ in range(ctx.world_size)] if ctx.rank == 0 else None
    dist.gather(padded, gathered, dst=0)
    if gathered is None:
        return None
    return [t[:n].cpu().numpy().tobytes() for t, n in zip(gathered, lengths)]


def broadcast_json(ctx: Dist, payload: Any) -> Any:
    """Rank 0's ``payload`` (JSON-able) on every rank."""
    import torch.distributed as dist

    data = json.dumps(payload).encode() if ctx.rank == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=ctx.device)
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    if ctx.rank == 0:
        buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(ctx.device)
    dist.broadcast(buf, src=0)
    return json.loads(buf.cpu().numpy().tobytes())


def all_ok(ctx: Dist, ok: bool) -> bool:
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def pack_rank_state(state: Mapping[str, Any], rank: int) -> bytes:
    """One rank's own state as ``<u64 tree length><tree JSON><safetensors bytes>``."""
    tree_name, tensors_name = rank_files(rank)
    snapshot = snapshot_state(state, {}, file_of=lambda top: tensors_name)
    snapshot.complete()
    image = snapshot.images.get(tensors_name)
    return struct.pack("<Q", len(snapshot.tree_json)) + snapshot.tree_json + (bytes(image.view()) if image else b"")


def unpack_rank_state(blob: bytes, rank: int) -> dict[str, bytes]:
    tree_name, tensors_name = rank_files(rank)
    (n,) = struct.unpack_from("<Q", blob)
    out = {tree_name: blob[8:8 + n]}
    if len(blob) > 8 + n:
        out[tensors_name] = blob[8 + n:]
    return out


def gather_rank_states(ctx: Dist, state: Mapping[str, Any],
                       rank_local_keys: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, bytes] | None, int]:
    """Splits off this rank's own keys of ``state`` and gathers every rank's on rank 0. Returns the
    shared state, on rank 0 the per-rank files (``{file name: bytes}``, None elsewhere), and the
    bytes this rank sent."""
    own = {k: v for k, v in state.items() if k in rank_local_keys}
    shared = {k: v for k, v in state.items() if k not in rank_local_keys}
    blob = pack_rank_state(own, ctx.rank)
    blobs = gather_bytes(ctx, blob)
    if blobs is None:
        return shared, None, len(blob)
    files = {fname: part for rank, data in enumerate(blobs) for fname, part in unpack_rank_state(data, rank).items()}
    return shared, files, len(blob)
