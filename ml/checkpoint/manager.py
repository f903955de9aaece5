"""Tiered checkpoints for training: what to save, when, and where.

Three tiers live under one root, each with its own retention and its own commit pointer:

* ``training/``: the full state for an exact resume, saved asynchronously, last N kept,
  optionally zstd-compressed.
* ``milestone/``: saved only when a metric improves on its best so far, kept indefinitely.
* ``production/``: weights + config + model card under a semantic version, never overwritten.

Every commit can be mirrored to S3 (:mod:`ml.checkpoint.s3`) and restored from it when the local
copy is missing. Under ``torch.distributed`` rank 0 writes the model and optimizer state and every
rank's own RNG and loop state goes into the same checkpoint. The on-disk format and the commit
protocol are in :mod:`ml.checkpoint.store`.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import math
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ml.checkpoint.store import (
    CHECKSUMS,
    COMPRESSIONS,
    STATE_JSON,
    CheckpointCorrupt,
    CheckpointExists,
    HostBuffer,
    IOTimes,
    bytes_writer,
    clean_leftovers,
    commit_checkpoint,
    decode_state,
    install_checkpoint,
    load_files,
    new_tmp_dir,
    pointer_names,
    read_manifest,
    read_pointer,
    remove_checkpoint,
    scan_tier,
    snapshot_state,
    verify_checkpoint,
    write_pointer,
)
from ml.errors import PipelineError
from ml.io import fsync_dir

__all__ = [
    "CheckpointCorrupt", "CheckpointExists", "CheckpointLocked", "CheckpointManager",
    "InvalidVersion", "LoadedCheckpoint", "ProductionCheckpoint", "SaveStats",
    "export_release", "is_improvement", "is_semver", "resolve_checkpoint", "should_save",
]

logger = logging.getLogger(__name__)

TIERS = ("training", "milestone", "production")
LATEST = "latest"
RANK_LOCAL_KEYS = ("rng", "generator", "loop")

# semver.org's regular expression, with [0-9] for \d so no other Unicode digits pass.
_SEMVER = re.compile(
    r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?")
_METRIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class CheckpointLocked(PipelineError):
    """Another checkpoint manager is writing under the same root."""


class InvalidVersion(PipelineError):
    """A production version that is not a semantic version (MAJOR.MINOR.PATCH[-pre][+build])."""


# --- decisions (pure) ------------------------------------------------------------------------------


def is_improvement(best: float | None, value: float, mode: str) -> bool:
    """Whether ``value`` strictly beats ``best`` (None: nothing saved yet). NaN and infinities
    never count as an improvement."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def is_semver(version: str) -> bool:
    return isinstance(version, str) and _SEMVER.fullmatch(version) is not None


def should_save(step: int, every_steps: int | None, last_save_time: float, now: float,
                every_seconds: float | None) -> bool:
    """Whether a training checkpoint is due after ``step``: every ``every_steps`` steps and/or once
    ``every_seconds`` have passed since the last save (either one set to None is off)."""
    by_steps = every_steps is not None and step % every_steps == 0
    by_time = every_seconds is not None and now - last_save_time >= every_seconds
    return by_steps or by_time


def training_checkpoint_name(step: int, epoch: int | None = None) -> str:
    """``step-00000120``; with an epoch, ``epoch-0003-step-00000120`` so that the state at the end
    of an epoch's last batch and the state after the epoch (same step) do not collide."""
    return f"step-{step:08d}" if epoch is None else f"epoch-{epoch:04d}-step-{step:08d}"


def rank_files(rank: int) -> tuple[str, str]:
    """The JSON tree and the tensors of one rank's own state in a distributed checkpoint."""
    return f"rank-{rank:05d}.json", f"rank-{rank:05d}.safetensors"


# --- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaveStats:
    """What one save cost. ``blocking_s`` is the time the training thread was held: the save call
    (including ``waited_s`` spent waiting for the previous save) plus ``step_wait_s``, the time an
    ``optimizer.step()`` waited for the background copy. ``background_s`` is the writer thread's
    time (0 for a synchronous save, whose write is inside ``blocking_s``); ``durable_s`` runs from
    the save call to the local commit being durable. The other times say where the work went,
    summed over threads (checksum and write overlap)."""

    tier: str
    name: str
    step: int | None
    blocking_s: float
    waited_s: float
    background_s: float
    bytes_written: int
    copy_s: float = 0.0
    checksum_s: float = 0.0
    write_s: float = 0.0
    fsync_s: float = 0.0
    compress_s: float = 0.0
    upload_s: float = 0.0
    durable_s: float = 0.0
    step_wait_s: float = 0.0


@dataclass(frozen=True)
class LoadedCheckpoint:
    tier: str
    name: str
    state: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) passed over


@dataclass(frozen=True)
class ProductionCheckpoint:
    version: str
    weights: dict[str, torch.Tensor]
    config: dict[str, Any]
    model_card: dict[str, Any]


# --- torch.distributed -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dist:
    rank: int
    world_size: int
    device: torch.device  # where the tensors of collectives live (CUDA for NCCL)


def _detect_distributed(flag: bool | None) -> _Dist | None:
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
    return _Dist(dist.get_rank(), dist.get_world_size(), device)


def _gather_bytes(ctx: _Dist, blob: bytes) -> list[bytes] | None:
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


def _broadcast_json(ctx: _Dist, payload: Any) -> Any:
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


def _all_ok(ctx: _Dist, ok: bool) -> bool:
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _pack_rank_state(state: Mapping[str, Any], rank: int) -> bytes:
    """One rank's own state as ``<u64 tree length><tree JSON><safetensors bytes>``."""
    tree_name, tensors_name = rank_files(rank)
    snapshot = snapshot_state(state, {}, file_of=lambda top: tensors_name)
    snapshot.complete()
    image = snapshot.images.get(tensors_name)
    return struct.pack("<Q", len(snapshot.tree_json)) + snapshot.tree_json + (bytes(image.view()) if image else b"")


def _unpack_rank_state(blob: bytes, rank: int) -> dict[str, bytes]:
    tree_name, tensors_name = rank_files(rank)
    (n,) = struct.unpack_from("<Q", blob)
    out = {tree_name: blob[8:8 + n]}
    if len(blob) > 8 + n:
        out[tensors_name] = blob[8 + n:]
    return out


# --- the manager -----------------------------------------------------------------------------------


class _InFlight:
    """The training save being written: its snapshot (which the optimizer guard waits on) and the
    time an optimizer step spent waiting for it."""

    def __init__(self, snapshot: Any) -> None:
        self.snapshot = snapshot
        self.step_wait_s = 0.0


class CheckpointManager:
    """Saves, lists, verifies and loads checkpoints in three tiers under ``root``.

    Training saves are asynchronous: :meth:`save_training_checkpoint` waits for the previous save
    (one in flight at most), lays the state out in reused host buffers, hands the copy and the write
    to one background thread and returns. A failed background save (or S3 upload) is re-raised by
    the next save, :meth:`wait` or :meth:`close`. Milestone and production saves are synchronous.

    One writing manager per root, enforced with a lock file; ``read_only=True`` takes no lock,
    cleans nothing and refuses to save (e.g. a server loading production weights). Methods are
    meant to be called from one thread; ``on_saved(stats)`` runs on whichever thread committed.

    Args:
        keep_last: training checkpoints kept (locally and in the mirror), >= 2.
        compress: ``"zstd"`` stores the training tier's tensor files compressed
            (``<file>.safetensors.zst``); milestones and releases stay plain.
        compress_level: the zstd level (1 fastest .. 22 smallest).
        checksum: the per-file checksum of the training tier. ``"crc32"`` detects every
            truncation (with the size), every flipped bit and every burst of up to 32 bits, at a
            third of SHA-256's CPU time, which on a machine the training keeps busy is most of what
            a background save costs it; ``"sha256"`` for a cryptographic digest. Milestones and
            releases, which are kept, always use SHA-256.
        mirror: an :class:`ml.checkpoint.s3.S3Mirror` that each commit is uploaded to after the local
            commit, with retention and pointers; checkpoints are restored from it when the local
            copy is missing.
        distributed: None detects an initialized ``torch.distributed`` group of more than one rank.
            Then every rank calls :meth:`save_training_checkpoint`, :meth:`load_latest_valid`
            and :meth:`close` together; rank 0 alone takes the lock and
            writes, storing the shared state once and each rank's ``rank_local_keys`` per rank.
            Every rank loads from the same root (one machine, or a shared filesystem).
        io_workers: files of one checkpoint written at once.
    """

    def __init__(self, root: str | Path, keep_last: int = 2, *,
                 on_saved: Callable[[SaveStats], None] | None = None, async_save: bool = True,
                 read_only: bool = False, compress: str = "none", compress_level: int = 3,
                 mirror: Any = None, distributed: bool | None = None,
                 rank_local_keys: tuple[str, ...] = RANK_LOCAL_KEYS, io_workers: int = 2,
                 checksum: str = "sha256") -> None:
        if keep_last < 2:
            raise ValueError("keep_last must be >= 2: the previous checkpoint stays while a save is in flight")
        if compress not in COMPRESSIONS:
            raise ValueError(f"compress must be one of {', '.join(COMPRESSIONS)}; got {compress!r}")
        if checksum not in CHECKSUMS:
            raise ValueError(f"checksum must be one of {', '.join(CHECKSUMS)}; got {checksum!r}")
        if not 1 <= compress_level <= 22:
            raise ValueError(f"compress_level must be in 1..22; got {compress_level!r}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.read_only = read_only
        self.compress, self.compress_level, self.checksum = compress, compress_level, checksum
        self.mirror = mirror
        self.rank_local_keys = tuple(rank_local_keys)
        self._dist = None if read_only else _detect_distributed(distributed)
        self._on_saved = on_saved
        self._callback_lock = threading.Lock()
        self._async = async_save
        self._io_workers = io_workers
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[SaveStats] | None = None
        self._inflight: _InFlight | None = None
        self._buffers: dict[str, HostBuffer] = {}
        self._guards: dict[int, Any] = {}
        self._lock_fd: int | None = None
        self._closed = False
        if not read_only and self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = self._acquire_lock()
            for tier in TIERS:
                self.tier_dir(tier).mkdir(exist_ok=True)
                clean_leftovers(self.tier_dir(tier))

    @property
    def rank(self) -> int:
        return self._dist.rank if self._dist is not None else 0

    @property
    def world_size(self) -> int:
        return self._dist.world_size if self._dist is not None else 1

    @property
    def is_distributed(self) -> bool:
        return self._dist is not None

    def _acquire_lock(self) -> int:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointLocked(f"{self.root} is in use by another checkpoint manager") from None
        return fd

    def tier_dir(self, tier: str) -> Path:
        if tier not in TIERS:
            raise ValueError(f"unknown checkpoint tier {tier!r}; expected one of {TIERS}")
        return self.root / tier

    def _writable(self) -> None:
        if self.read_only or self._closed or (self.rank == 0 and self._lock_fd is None):
            raise RuntimeError("this checkpoint manager is read-only or closed")

    def rank0_decides(self, value: bool) -> bool:
        """Rank 0's ``value`` on every rank (e.g. a time-based decision: clocks differ between
        ranks); ``value`` itself when not distributed."""
        return value if self._dist is None else bool(_broadcast_json(self._dist, value))

    def _report(self, stats: SaveStats) -> None:
        if self._on_saved is not None:
            with self._callback_lock:
                self._on_saved(stats)

    # --- training tier ---

    def save_training_checkpoint(self, state: Mapping[str, Any], step: int, *, epoch: int | None = None,
                                 optimizer: torch.optim.Optimizer | None = None) -> Future[SaveStats]:
        """Snapshots ``state`` and commits it in the background as ``training/<name>``.

        Policy: one save in flight. If the previous save is still writing, this call waits for it
        (and re-raises its error, if it failed) before taking the snapshot. After the commit the
        ``latest`` pointer is replaced, checkpoints beyond ``keep_last`` are deleted, and the
        mirror (if any) gets the checkpoint, the pointer and the same retention.

        Args:
            optimizer: with it, the tensors that only its ``step()`` modifies (its parameters and
                its state) are copied by the background thread while the caller goes on (e.g. with
                the next forward and backward); the optimizer's next ``step()`` waits until that copy
                is done. Every other tensor is copied before this call returns. Without it, all
                tensors are copied before the call returns. Parameters must then not be modified in
                place other than by ``optimizer.step()`` until the copy is done.

        Returns:
            A future of the :class:`SaveStats`; already resolved when ``async_save=False`` and on
            ranks other than 0.
        """
        self._writable()
        started = time.perf_counter()
        name = training_checkpoint_name(step, epoch)
        meta: dict[str, Any] = {"tier": "training", "step": step, "epoch": epoch}
        extra_writers: dict[str, Callable[[Path], dict[str, Any]]] = {}
        if self._dist is not None:
            own = {k: v for k, v in state.items() if k in self.rank_local_keys}
            state = {k: v for k, v in state.items() if k not in self.rank_local_keys}
            blob = _pack_rank_state(own, self.rank)
            blobs = _gather_bytes(self._dist, blob)
            if blobs is None:  # not rank 0: its part travelled in the gather
                done: Future[SaveStats] = Future()
                done.set_result(SaveStats("training", name, step, time.perf_counter() - started, 0.0, 0.0, len(blob)))
                return done
            for rank, data in enumerate(blobs):
                for fname, part in _unpack_rank_state(data, rank).items():
                    extra_writers[fname] = bytes_writer(part, checksum=self.checksum)
            meta["world_size"] = self._dist.world_size
        self.wait()
        waited = time.perf_counter() - started
        snapshot = snapshot_state(state, self._buffers, deferred=_step_modified(optimizer))
        inflight = _InFlight(snapshot)
        if snapshot.has_deferred and optimizer is not None:
            self._guard(optimizer)
        call_s = time.perf_counter() - started

        def write(synchronous: bool) -> SaveStats:
            t0 = time.perf_counter()
            snapshot.complete()
            times = IOTimes()
            writers = {**snapshot.writers(times, self.compress, self.compress_level, self.checksum), **extra_writers}
            result = commit_checkpoint(self.tier_dir("training"), name, writers, meta, replace=True,
                                       workers=self._io_workers, times=times)
            durable = time.perf_counter() - started
            write_pointer(self.tier_dir("training"), LATEST, {"name": name})
            self.prune("training", self.keep_last)
            upload_s, upload_error = self._mirror_commit("training", name, LATEST, {"name": name}, self.keep_last)
            background = 0.0 if synchronous else time.perf_counter() - t0
            blocking = time.perf_counter() - started if synchronous else call_s
            stats = SaveStats("training", name, step, blocking + inflight.step_wait_s, waited, background,
                              result.bytes_written, copy_s=snapshot.copy_s, checksum_s=times.checksum_s,
                              write_s=times.write_s, fsync_s=times.fsync_s, compress_s=times.compress_s,
                              upload_s=upload_s, durable_s=durable, step_wait_s=inflight.step_wait_s)
            self._report(stats)
            if upload_error is not None:
                raise upload_error
            return stats

        if not self._async:
            done = Future()
            done.set_result(write(True))
            return done
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._inflight = inflight
        self._pending = self._executor.submit(write, False)
        return self._pending

    def _guard(self, optimizer: torch.optim.Optimizer) -> None:
        """Makes ``optimizer.step()`` wait for the snapshot in flight (registered once)."""
        if id(optimizer) not in self._guards:
            self._guards[id(optimizer)] = optimizer.register_step_pre_hook(lambda *_: self._before_step())

    def _before_step(self) -> None:
        inflight = self._inflight
        if inflight is None:
            return
        started = time.perf_counter()
        inflight.snapshot.guard()
        inflight.step_wait_s += time.perf_counter() - started

    def wait(self) -> SaveStats | None:
        """Blocks until the save in flight is committed; re-raises its error if it failed."""
        pending, self._pending = self._pending, None
        try:
            return pending.result() if pending is not None else None
        finally:
            self._inflight = None

    def close(self) -> None:
        """Waits for the save in flight (raising its error) and releases the root. Distributed:
        every rank calls it; it returns once rank 0's last save is committed, and raises on every
        rank if that save failed."""
        if self._closed:
            return
        error: BaseException | None = None
        try:
            self.wait()
        except BaseException as exc:  # raised below, after the root is released
            error = exc
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            for handle in self._guards.values():
                handle.remove()
            self._guards.clear()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
        if self._dist is not None and not _all_ok(self._dist, error is None) and error is None:
            raise PipelineError(f"{self.root}: a checkpoint save failed on rank 0 (see its log)")
        if error is not None:
            raise error

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an exception is already on its way out: report a save failure, do not mask it
            self.close()
        except Exception:
            logger.exception("checkpoint save failed while handling another error")

    def load_latest_valid(self, tier: str = "training") -> LoadedCheckpoint | None:
        """The newest committed checkpoint (by commit order) that verifies. Newer ones that do not
        verify, and visible directories that are not committed checkpoints, are skipped, logged
        and listed in ``skipped``. With a mirror, when no local checkpoint verifies, the newest
        remote one that verifies after download is restored into the tier and loaded.

        This may be newer than :meth:`latest` by one checkpoint: a crash between a commit and the
        pointer update leaves a complete checkpoint the pointer does not name yet.

        Distributed: rank 0 chooses (and restores); every rank loads that checkpoint with its own
        per-rank state.

        Returns:
            None when there is no checkpoint at all.

        Raises:
            CheckpointCorrupt: checkpoints exist but none verifies.
            CheckpointMirrorError: the mirror could not be listed or read.
        """
        if self._dist is None:
            return self._load_latest_valid(tier)
        loaded, error = None, None
        if self.rank == 0:
            try:
                loaded = self._load_latest_valid(tier)
            except PipelineError as exc:
                error = exc
        choice = _broadcast_json(self._dist, {"name": loaded.name if loaded else None,
                                              "error": str(error) if error else None})
        if error is not None:
            _all_ok(self._dist, False)
            raise error
        if choice["error"] is not None:
            _all_ok(self._dist, False)
            raise CheckpointCorrupt(f"rank 0: {choice['error']}")
        failure: CheckpointCorrupt | None = None
        if choice["name"] is not None and loaded is None:
            try:
                loaded = LoadedCheckpoint(tier, choice["name"], self.load_checkpoint(tier, choice["name"]))
            except CheckpointCorrupt as exc:
                failure = exc
        if not _all_ok(self._dist, failure is None):
            raise failure or CheckpointCorrupt(f"{self.tier_dir(tier) / choice['name']}: could not be loaded on "
                                               "every rank")
        return loaded

    def _load_latest_valid(self, tier: str) -> LoadedCheckpoint | None:
        committed, rejected = scan_tier(self.tier_dir(tier))
        skipped = list(rejected)
        for name, _ in reversed(committed):
            try:
                state = self.load_checkpoint(tier, name)
            except CheckpointCorrupt as exc:
                skipped.append((name, str(exc)))
                continue
            return self._loaded(tier, name, state, skipped)
        if self.mirror is not None and not self.read_only:
            remote, _ = self.mirror.list(tier)
            for name, _ in reversed(remote):
                try:
                    self._restore(tier, name)
                    state = self.load_checkpoint(tier, name)
                except CheckpointCorrupt as exc:
                    skipped.append((name, str(exc)))
                    continue
                logger.info("restored checkpoint %s/%s from %s", tier, name, self.mirror.url(tier, name))
                return self._loaded(tier, name, state, skipped)
        if skipped:
            raise CheckpointCorrupt(f"no valid checkpoint in {self.tier_dir(tier)}: "
                                    + "; ".join(reason for _, reason in skipped))
        return None

    def _loaded(self, tier: str, name: str, state: dict[str, Any], skipped: list[tuple[str, str]]) -> LoadedCheckpoint:
        for bad, reason in skipped:
            logger.warning("skipped checkpoint %s/%s: %s", tier, bad, reason)
        return LoadedCheckpoint(tier, name, state, skipped)

    # --- milestone tier ---

    def best(self, metric: str) -> tuple[str, float, str] | None:
        """``(name, value, mode)`` of the best milestone for ``metric``, from the ``best_<metric>``
        pointer when it names a committed milestone, else from the manifests."""
        committed = [(n, body["meta"]) for n, body in scan_tier(self.tier_dir("milestone"))[0]
                     if body["meta"].get("metric") == metric]
        pointer = read_pointer(self.tier_dir("milestone"), f"best_{metric}")
        for name, meta in committed:
            if pointer is not None and name == pointer["name"]:
                return name, meta["value"], meta["mode"]
        best = None
        for name, meta in committed:
            if best is None or is_improvement(best[1], meta["value"], meta["mode"]):
                best = (name, meta["value"], meta["mode"])
        return best

    def save_milestone_checkpoint(self, state: Mapping[str, Any], metric: str, value: float, mode: str,
                                  epoch: int, step: int, run_id: str | None = None,
                                  notes: str = "") -> SaveStats | None:
        """Saves ``state`` (synchronously) if ``value`` improves on the best so far for ``metric``;
        returns None when it does not. Milestones are never pruned automatically; a
        ``milestone.json`` sidecar holds metric, value, mode, epoch, step, run id and notes.
        Distributed: rank 0 decides and saves; other ranks return None."""
        self._writable()
        if not _METRIC.fullmatch(metric):
            raise ValueError(f"metric name {metric!r} must match {_METRIC.pattern}")
        if self.rank != 0:
            return None
        best = self.best(metric)
        if best is not None and best[2] != mode:
            raise ValueError(f"metric {metric!r} was saved with mode {best[2]!r}, not {mode!r}")
        if not is_improvement(best[1] if best else None, float(value), mode):
            return None
        self.wait()  # the training save in flight uses the host buffers this one reuses
        started = time.perf_counter()
        snapshot = snapshot_state(state, self._buffers)
        sidecar = {"metric": metric, "value": float(value), "mode": mode, "epoch": epoch, "step": step,
                   "run_id": run_id, "notes": notes}
        times = IOTimes()
        writers = snapshot.writers(times)
        writers["milestone.json"] = bytes_writer(json.dumps(sidecar, indent=2, sort_keys=True).encode(), times)
        tier_dir = self.tier_dir("milestone")
        base = f"{metric}-epoch-{epoch:04d}-step-{step:08d}"
        name, n = base, 1
        while (tier_dir / name).exists():
            n += 1
            name = f"{base}-{n}"
        result = commit_checkpoint(tier_dir, name, writers, {"tier": "milestone", **sidecar},
                                   workers=self._io_workers, times=times)
        durable = time.perf_counter() - started
        pointer = {"name": name, "value": float(value), "mode": mode}
        write_pointer(tier_dir, f"best_{metric}", pointer)
        upload_s, upload_error = self._mirror_commit("milestone", name, f"best_{metric}", pointer, None)
        stats = SaveStats("milestone", name, step, time.perf_counter() - started, 0.0, 0.0, result.bytes_written,
                          copy_s=snapshot.copy_s, checksum_s=times.checksum_s, write_s=times.write_s,
                          fsync_s=times.fsync_s, upload_s=upload_s, durable_s=durable)
        self._report(stats)
        if upload_error is not None:
            raise upload_error
        return stats

    # --- production tier ---

    def save_production_checkpoint(self, weights: Mapping[str, torch.Tensor], version: str,
                                   config: Mapping[str, Any], model_card: Mapping[str, Any]) -> SaveStats:
        """Publishes weights-only ``model.safetensors`` + ``config.json`` + ``model_card.json`` as
        ``production/<version>`` and points ``latest`` at it (the last one published).

        Raises:
            InvalidVersion: ``version`` is not a semantic version.
            CheckpointExists: that version exists; published versions are immutable.
        """
        self._writable()
        if self.rank != 0:
            raise RuntimeError("production checkpoints are published from rank 0")
        if not is_semver(version):
            raise InvalidVersion(f"production version {version!r} is not a semantic version (e.g. 1.4.0)")
        tier_dir = self.tier_dir("production")
        if (tier_dir / version).exists():
            raise CheckpointExists(f"production version {version} already exists; publish a new version")
        bad = [k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"production weights must map str to Tensor; offending keys: {bad[:5]}")
        self.wait()
        started = time.perf_counter()
        snapshot = snapshot_state({"model": dict(weights)}, self._buffers)
        times = IOTimes()
        writers: dict[str, Callable[[Path], dict[str, Any]]] = {
            fname: w for fname, w in snapshot.writers(times).items() if fname != STATE_JSON}
        if "model.safetensors" not in writers:  # no tensors at all: still a loadable (empty) file
            from safetensors.torch import save

            writers["model.safetensors"] = bytes_writer(save({}), times)
        writers["config.json"] = bytes_writer(json.dumps(dict(config), indent=2, sort_keys=True,
                                                         allow_nan=False).encode(), times)
        writers["model_card.json"] = bytes_writer(json.dumps(dict(model_card), indent=2, sort_keys=True,
                                                             allow_nan=False).encode(), times)
        result = commit_checkpoint(tier_dir, version, writers, {"tier": "production", "version": version},
                                   workers=self._io_workers, times=times)
        durable = time.perf_counter() - started
        write_pointer(tier_dir, LATEST, {"name": version})
        upload_s, upload_error = self._mirror_commit("production", version, LATEST, {"name": version}, None)
        stats = SaveStats("production", version, None, time.perf_counter() - started, 0.0, 0.0,
                          result.bytes_written, copy_s=snapshot.copy_s, checksum_s=times.checksum_s,
                          write_s=times.write_s, fsync_s=times.fsync_s, upload_s=upload_s, durable_s=durable)
        self._report(stats)
        if upload_error is not None:
            raise upload_error
        return stats

    def load_production(self, version: str) -> ProductionCheckpoint:
        if not is_semver(version):
            raise InvalidVersion(f"production version {version!r} is not a semantic version (e.g. 1.4.0)")
        files, _ = self._load_files("production", version)
        return ProductionCheckpoint(version, files["model.safetensors"], files["config.json"],
                                    files["model_card.json"])

    # --- the mirror ---

    def _mirror_commit(self, tier: str, name: str, pointer: str, payload: Mapping[str, Any],
                       keep: int | None) -> tuple[float, Exception | None]:
        """Uploads a local commit, then its pointer, then applies retention remotely. Returns the
        time taken and the error to raise once the save is reported (the local commit stands)."""
        if self.mirror is None:
            return 0.0, None
        started = time.perf_counter()
        try:
            self.mirror.upload(tier, name, self.tier_dir(tier) / name)
            self.mirror.write_pointer(tier, pointer, payload)
            if keep is not None:
                self.mirror.prune(tier, keep, protected={name})
        except Exception as exc:  # surfaces like any background error: at the next call or close
            return time.perf_counter() - started, exc
        return time.perf_counter() - started, None

    def _restore(self, tier: str, name: str) -> None:
        """Downloads ``name`` from the mirror into a temporary directory, verifying every file
        against the remote manifest, and installs it in place of any local copy."""
        self._writable()
        tmp = new_tmp_dir(self.tier_dir(tier), name)
        try:
            self.mirror.download(tier, name, tmp)
            fsync_dir(tmp)
            install_checkpoint(self.tier_dir(tier), tmp, name, replace=True)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def list_remote(self, tier: str) -> list[str]:
        """Committed checkpoints in the mirror, oldest first; [] without a mirror."""
        self.tier_dir(tier)
        return [name for name, _ in self.mirror.list(tier)[0]] if self.mirror is not None else []

    # --- any tier ---

    def list(self, tier: str) -> list[str]:
        """Committed checkpoints, oldest first (by commit time). Uncommitted ones never appear."""
        return [name for name, _ in scan_tier(self.tier_dir(tier))[0]]

    def _pointer_target(self, tier: str, committed: list[str]) -> str | None:
        pointer = read_pointer(self.tier_dir(tier), LATEST)
        return pointer["name"] if pointer is not None and pointer["name"] in committed else None

    def latest(self, tier: str) -> str | None:
        """The ``latest`` pointer's target if it is a committed checkpoint, else the newest one."""
        names = self.list(tier)
        return self._pointer_target(tier, names) or (names[-1] if names else None)

    def pointers(self, tier: str) -> dict[str, str]:
        """``{pointer: checkpoint name}`` for the tier's pointers (``latest``, ``best_<metric>``)."""
        out = {}
        for pointer in pointer_names(self.tier_dir(tier)):
            payload = read_pointer(self.tier_dir(tier), pointer)
            if payload is not None:
                out[pointer] = payload["name"]
        return out

    def prune(self, tier: str, keep: int) -> list[str]:
        """Deletes the oldest committed checkpoints beyond ``keep``, never one a pointer names
        (``latest``, ``best_<metric>``). Returns the deleted names."""
        self._writable()
        if self.rank != 0:
            return []
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        names = self.list(tier)
        protected = set(self.pointers(tier).values()) & set(names)
        doomed = [n for n in names[:max(len(names) - keep, 0)] if n not in protected]
        for name in doomed:
            remove_checkpoint(self.tier_dir(tier), name)
        return doomed

    def verify(self, tier: str, name: str) -> dict[str, Any]:
        """Checks every file's size and checksum; returns the manifest's metadata.

        Raises:
            CheckpointCorrupt: naming the file that is missing, truncated or altered.
        """
        return verify_checkpoint(self._checkpoint_dir(tier, name))["meta"]

    def describe(self, tier: str, name: str) -> dict[str, Any]:
        """The manifest's metadata (tier, step, metric, version...) without reading the files."""
        return read_manifest(self._checkpoint_dir(tier, name))["meta"]

    def load_checkpoint(self, tier: str, name: str, *, rank: int | None = None) -> dict[str, Any]:
        """Verifies and loads a checkpoint: the saved state for training and milestone tiers;
        ``{file stem: contents}`` for a production one. A distributed checkpoint's per-rank state
        is that of ``rank`` (default: this process's rank). With a mirror, a checkpoint missing
        locally is restored from it first."""
        files, body = self._load_files(tier, name)
        where = self._checkpoint_dir(tier, name)
        if STATE_JSON not in files:
            return {Path(fname).stem: content for fname, content in files.items()}
        state = decode_state(files[STATE_JSON], files, where)
        world = body["meta"].get("world_size")
        if world is not None:
            rank = self.rank if rank is None else rank
            tree_name, _ = rank_files(rank)
            if tree_name not in files:
                raise CheckpointCorrupt(f"{where}: saved by {world} ranks; rank {rank} has no state in it")
            state.update(decode_state(files[tree_name], files, where))
        return state

    def _checkpoint_dir(self, tier: str, name: str) -> Path:
        if not name or name.startswith(".") or "/" in name or name != Path(name).name:
            raise ValueError(f"invalid checkpoint name {name!r}")
        return self.tier_dir(tier) / name

    def _load_files(self, tier: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        where = self._checkpoint_dir(tier, name)
        if self.mirror is not None and not self.read_only and self.rank == 0 and not where.exists():
            self._restore(tier, name)
        return load_files(where)


def _step_modified(optimizer: torch.optim.Optimizer | None) -> Callable[[torch.Tensor], bool] | None:
    """Whether a tensor shares storage with the optimizer's parameters or state: those change only
    in ``optimizer.step()``."""
    if optimizer is None:
        return None
    storages = {p.untyped_storage().data_ptr() for group in optimizer.param_groups for p in group["params"]}
    storages |= {v.untyped_storage().data_ptr() for per_param in optimizer.state.values()
                 for v in per_param.values() if isinstance(v, torch.Tensor)}
    storages.discard(0)
    return lambda t: t.untyped_storage().data_ptr() in storages


# --- references and releases ------------------------------------------------------------------------


def resolve_checkpoint(manager: CheckpointManager, tier: str, ref: str) -> str:
    """The checkpoint ``ref`` names in ``tier``: a checkpoint name, ``latest``, or ``best_<metric>``
    (milestone tier).

    Raises:
        PipelineError: naming ``ref`` and what was expected.
    """
    names = manager.list(tier)
    if ref == LATEST:
        target = manager.latest(tier)
    elif ref.startswith("best_") and tier == "milestone":
        best = manager.best(ref[len("best_"):])
        target = best[0] if best else None
    else:
        target = ref if ref in names else None
    if target is None:
        raise PipelineError(f"{tier}/{ref}: no such committed checkpoint (expected a name from `mlops checkpoints "
                            f"list`, latest{', or best_<metric>' if tier == 'milestone' else ''})")
    return target


def release_documents(state: Mapping[str, Any], meta: Mapping[str, Any], *, tier: str, name: str, version: str,
                      description: str, intended_use: str, limitations: str,
                      now: dt.datetime | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(weights, config, model card)`` of a production release made from a training or milestone
    checkpoint's state: the weights are ``state["model"]``; the config and the card take the
    model spec, dataset version, metrics, run and commit from ``state["extra"]`` and the
    manifest's metadata where present.

    Raises:
        PipelineError: the state holds no model weights.
    """
    weights = state.get("model")
    if not isinstance(weights, Mapping) or not weights or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise PipelineError(f"{tier}/{name}: expected model weights under 'model' (a mapping of names to tensors)")
    extra = state.get("extra") if isinstance(state.get("extra"), Mapping) else {}
    config: dict[str, Any] = {
        key: extra[key] for key in ("model_spec", "classes", "features") if key in extra}
    if "config" in extra:
        config["training"] = extra["config"]
    config["tensors"] = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                         for k, v in weights.items()}
    loop = state.get("loop") if isinstance(state.get("loop"), Mapping) else {}
    history = loop.get("history") or [{}]
    last_epoch = {k: v for k, v in history[-1].items() if k not in ("epoch", "step")}
    metrics = dict(extra.get("metrics") or last_epoch)
    if "metric" in meta and "value" in meta:
        metrics.setdefault(meta["metric"], meta["value"])
    source = {"tier": tier, "checkpoint": name, "step": meta.get("step", loop.get("global_step")),
              "epoch": meta.get("epoch", loop.get("epoch"))}
    source.update({key: extra[key] for key in ("run_id", "git_commit", "fingerprint") if extra.get(key) is not None})
    card: dict[str, Any] = {
        "version": version, "description": description, "intended_use": intended_use, "limitations": limitations,
        "created_at": (now or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds"),
        "source": source, "metrics": metrics,
        "files": {"weights": "model.safetensors", "config": "config.json"},
    }
    if "dataset" in extra:
        card["dataset"] = extra["dataset"]
    if "environment" in extra:
        card["environment"] = extra["environment"]
    return dict(weights), config, card


def export_release(manager: CheckpointManager, tier: str, ref: str, *, version: str, description: str,
                   intended_use: str, limitations: str) -> tuple[str, SaveStats]:
    """Publishes the training or milestone checkpoint ``ref`` (see :func:`resolve_checkpoint`) as
    ``production/<version>``. Returns the checkpoint name and the save's stats."""
    if tier not in ("training", "milestone"):
        raise PipelineError(f"tier {tier!r}: expected training or milestone (releases are made from those)")
    if not is_semver(version):
        raise InvalidVersion(f"production version {version!r} is not a semantic version (e.g. 1.4.0)")
    name = resolve_checkpoint(manager, tier, ref)
    state = manager.load_checkpoint(tier, name, rank=0)
    weights, config, card = release_documents(state, manager.describe(tier, name), tier=tier, name=name,
                                              version=version, description=description,
                                              intended_use=intended_use, limitations=limitations)
    return name, manager.save_production_checkpoint(weights, version, config, card)
