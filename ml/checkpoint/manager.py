"""Tiered checkpoints for training: saving them, with the reading side from
:class:`ml.checkpoint.reader.CheckpointReader`.

Three tiers live under one root, each with its own retention and its own commit pointer:

* ``training/``: the full state for an exact resume, saved asynchronously, last N kept,
  optionally zstd-compressed.
* ``milestone/``: saved only when a metric improves on its best so far, kept indefinitely.
* ``production/``: weights + config + model card under a semantic version, never overwritten.

Every commit can be mirrored to S3 (:mod:`ml.checkpoint.s3`) and restored from it when the local
copy is missing. Under ``torch.distributed`` rank 0 writes the model and optimizer state and every
rank's own RNG and loop state goes into the same checkpoint (:mod:`ml.checkpoint.distributed`).
What a training state holds is :mod:`ml.checkpoint.state`; when to save and what to keep,
:mod:`ml.checkpoint.policy`; the on-disk format and the commit protocol, :mod:`ml.checkpoint.store`.

At ~460 lines this module is over the usual size: :class:`CheckpointManager` is one object whose
saves share one root lock, one save in flight and the host buffers every tier reuses, and its
save paths read best together; everything around it lives in the modules named above.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ml.checkpoint.checksums import CHECKSUMS
from ml.checkpoint.distributed import (
    RANK_LOCAL_KEYS,
    all_ok,
    broadcast_json,
    detect_distributed,
    gather_rank_states,
)
from ml.checkpoint.policy import (
    METRIC_NAME,
    TIERS,
    is_improvement,
    is_metric_name,
    is_semver,
    milestone_base_name,
    retention_victims,
    should_save,
    training_checkpoint_name,
)
from ml.checkpoint.reader import LATEST, CheckpointReader, InvalidVersion, LoadedCheckpoint, ProductionCheckpoint
from ml.checkpoint.snapshot import HostBuffer, modified_by_step, snapshot_state
from ml.checkpoint.store import (
    COMPRESSIONS,
    STATE_JSON,
    CheckpointCorrupt,
    CheckpointExists,
    clean_leftovers,
    commit_checkpoint,
    remove_checkpoint,
    write_pointer,
)
from ml.checkpoint.writers import IdleThreads, IOTimes, bytes_writer
from ml.errors import PipelineError

__all__ = [
    "CheckpointCorrupt", "CheckpointExists", "CheckpointLocked", "CheckpointManager", "InvalidVersion",
    "LoadedCheckpoint", "ProductionCheckpoint", "SaveStats", "is_improvement", "is_semver", "should_save",
]

logger = logging.getLogger(__name__)

WRITER_PRIORITIES = ("normal", "idle")
DEFAULT_CHECKSUM = "crc32c"
DEFAULT_WRITER_PRIORITY = "normal"


class CheckpointLocked(PipelineError):
    """Another checkpoint manager is writing under the same root."""


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


class _InFlight:
    """The training save being written: its snapshot (which the optimizer guard waits on), the time
    an optimizer step spent waiting for it, and its idle writer threads (None at normal priority)."""

    def __init__(self, snapshot: Any, idle: IdleThreads | None) -> None:
        self.snapshot = snapshot
        self.idle = idle
        self.step_wait_s = 0.0


class CheckpointManager(CheckpointReader):
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
        checksum: the per-file checksum of the training tier (see :mod:`ml.checkpoint.checksums`).
            ``"crc32c"`` (hardware CRC-32C) detects every truncation (with the size), every
            flipped bit and every burst of up to 32 bits at a tenth of SHA-256's CPU time, which
            on a machine the training keeps busy is most of what a background save costs it;
            ``"sha256"`` for a cryptographic digest. Milestones and releases, which are kept,
            always use SHA-256.
        writer_priority: ``"idle"`` runs the training tier's checksum and write threads at idle
            scheduling priority, so they take only CPU time the training leaves: less stall, and
            a commit that is durable later when the training keeps every core busy (the snapshot
            copy keeps normal priority, since the next ``optimizer.step()`` waits for it). Once
            anything waits for the save (the next save, :meth:`wait`, :meth:`close`), its threads
            go back to normal priority. ``"normal"`` shares the CPU evenly.
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
                 checksum: str = DEFAULT_CHECKSUM, writer_priority: str = DEFAULT_WRITER_PRIORITY) -> None:
        if keep_last < 2:
            raise ValueError("keep_last must be >= 2: the previous checkpoint stays while a save is in flight")
        if compress not in COMPRESSIONS:
            raise ValueError(f"compress must be one of {', '.join(COMPRESSIONS)}; got {compress!r}")
        if checksum not in CHECKSUMS:
            raise ValueError(f"checksum must be one of {', '.join(CHECKSUMS)}; got {checksum!r}")
        if writer_priority not in WRITER_PRIORITIES:
            raise ValueError(f"writer_priority must be one of {', '.join(WRITER_PRIORITIES)}; got {writer_priority!r}")
        if not 1 <= compress_level <= 22:
            raise ValueError(f"compress_level must be in 1..22; got {compress_level!r}")
        super().__init__(root, mirror=mirror, dist=None if read_only else detect_distributed(distributed),
                         read_only=read_only)
        self.keep_last = keep_last
        self.compress, self.compress_level, self.checksum = compress, compress_level, checksum
        self.writer_priority = writer_priority
        self.rank_local_keys = tuple(rank_local_keys)
        self._on_saved = on_saved
        self._callback_lock = threading.Lock()
        self._async = async_save
        self._io_workers = io_workers
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[SaveStats] | None = None
        self._inflight: _InFlight | None = None
        self._buffers: dict[str, HostBuffer] = {}
        self._guards: dict[int, Any] = {}
        if not read_only and self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = self._acquire_lock()
            for tier in TIERS:
                self.tier_dir(tier).mkdir(exist_ok=True)
                clean_leftovers(self.tier_dir(tier))

    def _acquire_lock(self) -> int:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointLocked(f"{self.root} is in use by another checkpoint manager") from None
        return fd

    def rank0_decides(self, value: bool) -> bool:
        """Rank 0's ``value`` on every rank (e.g. a time-based decision: clocks differ between
        ranks); ``value`` itself when not distributed."""
        return value if self._dist is None else bool(broadcast_json(self._dist, value))

    def _report(self, stats: SaveStats) -> None:
        if self._on_saved is not None:
            with self._callback_lock:
                self._on_saved(stats)

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
            state, files, sent = gather_rank_states(self._dist, state, self.rank_local_keys)
            if files is None:  # not rank 0: its part travelled in the gather
                done: Future[SaveStats] = Future()
                done.set_result(SaveStats("training", name, step, time.perf_counter() - started, 0.0, 0.0, sent))
                return done
            extra_writers = {fname: bytes_writer(part, checksum=self.checksum) for fname, part in files.items()}
            meta["world_size"] = self._dist.world_size
        self.wait()
        waited = time.perf_counter() - started
        snapshot = snapshot_state(state, self._buffers, deferred=modified_by_step(optimizer))
        # A synchronous save has its caller waiting: its writers keep normal priority.
        idle = IdleThreads() if self.writer_priority == "idle" and self._async else None
        inflight = _InFlight(snapshot, idle)
        if snapshot.has_deferred and optimizer is not None:
            self._guard(optimizer)
        call_s = time.perf_counter() - started

        def write(synchronous: bool) -> SaveStats:
            t0 = time.perf_counter()
            snapshot.complete()
            times = IOTimes()
            writers = {**snapshot.writers(times, self.compress, self.compress_level, self.checksum, idle),
                       **extra_writers}
            result = commit_checkpoint(self.tier_dir("training"), name, writers, meta, replace=True,
                                       workers=self._io_workers, times=times, idle=idle)
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
        if self._inflight is not None and self._inflight.idle is not None:
            self._inflight.idle.restore()  # the caller waits for it: yielding the CPU gains nothing now
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
        if self._dist is not None and not all_ok(self._dist, error is None) and error is None:
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

    def save_milestone_checkpoint(self, state: Mapping[str, Any], metric: str, value: float, mode: str,
                                  epoch: int, step: int, run_id: str | None = None,
                                  notes: str = "") -> SaveStats | None:
        """Saves ``state`` (synchronously) if ``value`` improves on the best so far for ``metric``;
        returns None when it does not. Milestones are never pruned automatically; a
        ``milestone.json`` sidecar holds metric, value, mode, epoch, step, run id and notes.
        Distributed: rank 0 decides and saves; other ranks return None."""
        self._writable()
        if not is_metric_name(metric):
            raise ValueError(f"metric name {metric!r} must match {METRIC_NAME.pattern}")
        if self.rank != 0:
            return None
        best = self.best(metric)
        if best is not None and best[2] != mode:
            raise ValueError(f"metric {metric!r} was saved with mode {best[2]!r}, not {mode!r}")
        if not is_improvement(best[1] if best else None, float(value), mode):
            return None
        sidecar = {"metric": metric, "value": float(value), "mode": mode, "epoch": epoch, "step": step,
                   "run_id": run_id, "notes": notes}
        base = milestone_base_name(metric, epoch, step)
        name, n = base, 1
        while (self.tier_dir("milestone") / name).exists():
            n += 1
            name = f"{base}-{n}"
        extra = {"milestone.json": json.dumps(sidecar, indent=2, sort_keys=True).encode()}
        return self._save_now("milestone", name, step, state, extra, {"tier": "milestone", **sidecar},
                              f"best_{metric}", {"name": name, "value": float(value), "mode": mode})

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
        extra = {name: json.dumps(dict(doc), indent=2, sort_keys=True, allow_nan=False).encode()
                 for name, doc in (("config.json", config), ("model_card.json", model_card))}
        if not weights:  # no tensors at all: still a loadable (empty) file
            from safetensors.torch import save

            extra["model.safetensors"] = save({})
        return self._save_now("production", version, None, {"model": dict(weights)}, extra,
                              {"tier": "production", "version": version}, LATEST, {"name": version},
                              tree=False)

    def point_latest_release(self, version: str) -> bool:
        """Makes the production tier's ``latest`` name ``version``, a release already published,
        locally and on the mirror, wherever that release is committed: a rollback or re-promotion
        makes an older release live again. Returns False, changing nothing, where it is neither."""
        self._writable()
        if self.rank != 0:
            return False
        local = version in self.list("production")
        if local:  # before the mirror is asked, so an unreachable mirror leaves the local pointer right
            write_pointer(self.tier_dir("production"), LATEST, {"name": version})
        remote = self.mirror is not None and version in {name for name, _ in self.mirror.list("production")[0]}
        if remote:
            self.mirror.write_pointer("production", LATEST, {"name": version})
        return local or remote

    def _save_now(self, tier: str, name: str, step: int | None, state: Mapping[str, Any],
                  extra: Mapping[str, bytes], meta: Mapping[str, Any], pointer: str, payload: Mapping[str, Any],
                  *, tree: bool = True) -> SaveStats:
        """A synchronous save (milestone, production; SHA-256 digests): ``state``'s files plus the
        ``extra`` files, committed, then ``pointer`` replaced and the mirror updated. Without
        ``tree`` no ``state.json`` is written (a release is weights and documents only)."""
        self.wait()  # the training save in flight uses the host buffers this one reuses
        started = time.perf_counter()
        snapshot = snapshot_state(state, self._buffers)
        times = IOTimes()
        writers = {fname: w for fname, w in snapshot.writers(times).items() if tree or fname != STATE_JSON}
        writers.update({fname: bytes_writer(data, times) for fname, data in extra.items()})
        result = commit_checkpoint(self.tier_dir(tier), name, writers, meta, workers=self._io_workers, times=times)
        durable = time.perf_counter() - started
        write_pointer(self.tier_dir(tier), pointer, payload)
        upload_s, upload_error = self._mirror_commit(tier, name, pointer, payload, None)
        stats = SaveStats(tier, name, step, time.perf_counter() - started, 0.0, 0.0, result.bytes_written,
                          copy_s=snapshot.copy_s, checksum_s=times.checksum_s, write_s=times.write_s,
                          fsync_s=times.fsync_s, upload_s=upload_s, durable_s=durable)
        self._report(stats)
        if upload_error is not None:
            raise upload_error
        return stats

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

    def prune(self, tier: str, keep: int) -> list[str]:
        """Deletes the oldest committed checkpoints beyond ``keep``, never one a pointer names
        (``latest``, ``best_<metric>``). Returns the deleted names."""
        self._writable()
        if self.rank != 0:
            return []
        doomed = retention_victims(self.list(tier), keep, self.pointers(tier).values())
        for name in doomed:
            remove_checkpoint(self.tier_dir(tier), name)
        return doomed
