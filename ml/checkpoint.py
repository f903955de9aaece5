"""Tiered checkpoints for training: what to save, when, and where.

Three tiers live under one root, each with its own retention and its own commit pointer:

* ``training/``: the full state for an exact resume, saved asynchronously, last N kept.
* ``milestone/``: saved only when a metric improves on its best so far, kept indefinitely.
* ``production/``: weights + config + model card under a semantic version, never overwritten.

The on-disk format and the commit protocol are in :mod:`ml.checkpoint_store`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ml.checkpoint_store import (
    STATE_JSON,
    CheckpointCorrupt,
    CheckpointExists,
    clean_leftovers,
    commit_checkpoint,
    decode_state,
    load_files,
    read_manifest,
    read_pointer,
    remove_checkpoint,
    scan_tier,
    snapshot_state,
    verify_checkpoint,
    write_pointer,
)
from ml.errors import PipelineError
from ml.loop import LoopState

__all__ = [
    "CheckpointCorrupt", "CheckpointExists", "CheckpointHook", "CheckpointLocked", "CheckpointManager",
    "InvalidVersion", "LoadedCheckpoint", "ProductionCheckpoint", "ResumeResult", "SaveStats",
    "capture_rng_state", "is_improvement", "is_semver", "restore_rng_state", "restore_training_state",
    "should_save", "training_state",
]

logger = logging.getLogger(__name__)

TIERS = ("training", "milestone", "production")
LATEST = "latest"

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


# --- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaveStats:
    """What one save cost. ``blocking_s`` is the time the caller was held, including ``waited_s``
    spent waiting for the previous save; ``background_s`` is the writer thread's time (0 for a
    synchronous save, whose write is inside ``blocking_s``)."""

    tier: str
    name: str
    step: int | None
    blocking_s: float
    waited_s: float
    background_s: float
    bytes_written: int


@dataclass(frozen=True)
class LoadedCheckpoint:
    tier: str
    name: str
    state: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) passed over


@dataclass(frozen=True)
class ResumeResult:
    name: str
    loop_state: LoopState
    extra: dict[str, Any]
    skipped: list[tuple[str, str]]


@dataclass(frozen=True)
class ProductionCheckpoint:
    version: str
    weights: dict[str, torch.Tensor]
    config: dict[str, Any]
    model_card: dict[str, Any]


# --- exact-resume state ----------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (legacy global), torch CPU and CUDA generator states as tensors and JSON
    scalars, so they round-trip through safetensors + JSON without pickle."""
    py_version, py_mt, py_gauss = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {"version": py_version, "mt": torch.tensor(py_mt, dtype=torch.int64), "gauss_next": py_gauss},
        "numpy": {"bit_generator": bit_generator, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["bit_generator"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if not torch.cuda.is_available():
            logger.warning("checkpoint holds CUDA RNG states but no CUDA device is available; not restored")
        else:
            torch.cuda.set_rng_state_all(list(state["cuda"]))


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, *, loop_state: LoopState,
                   generator: torch.Generator, scheduler: Any = None, scaler: Any = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything a bit-identical resume needs. The tensors are the live ones (no copy): hand the
    dict straight to :meth:`CheckpointManager.save_training_checkpoint`, which snapshots it."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "loop": {"epoch": loop_state.epoch, "global_step": loop_state.global_step,
                 "batch_in_epoch": loop_state.batch_in_epoch,
                 "epoch_generator_state": loop_state.epoch_generator_state,
                 "history": [dict(h) for h in loop_state.history], "stop": loop_state.stop},
        "generator": generator.get_state(),
        "rng": capture_rng_state(),
        "extra": dict(extra or {}),
    }


def restore_training_state(state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, *,
                           generator: torch.Generator, scheduler: Any = None, scaler: Any = None) -> LoopState:
    """Loads ``state`` (from :func:`training_state`) into freshly built objects; returns the
    :class:`LoopState` to pass to :func:`ml.loop.fit`. RNGs are restored last, after anything the
    caller did to build the objects has consumed random numbers."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            if state.get(name) is None:
                raise CheckpointCorrupt(f"checkpoint has no {name} state but a {name} was given")
            obj.load_state_dict(state[name])
    loop = state["loop"]
    generator.set_state(state["generator"])
    restore_rng_state(state["rng"])
    return LoopState(epoch=loop["epoch"], global_step=loop["global_step"], batch_in_epoch=loop["batch_in_epoch"],
                     epoch_generator_state=loop["epoch_generator_state"],
                     history=[dict(h) for h in loop["history"]], stop=loop["stop"])


# --- the manager -----------------------------------------------------------------------------------


class CheckpointManager:
    """Saves, lists, verifies and loads checkpoints in three tiers under ``root``.

    Training saves are asynchronous: :meth:`save_training_checkpoint` waits for the previous save
    (one in flight at most), copies the state into reused host buffers, hands the write to one
    background thread and returns. A failed background save is re-raised by the next save,
    :meth:`wait` or :meth:`close`. Milestone and production saves are synchronous.

    One writing manager per root, enforced with a lock file; ``read_only=True`` takes no lock,
    cleans nothing and refuses to save (e.g. a server loading production weights). Methods are
    meant to be called from one thread; ``on_saved(stats)`` runs on whichever thread committed.
    """

    def __init__(self, root: str | Path, keep_last: int = 2, *,
                 on_saved: Callable[[SaveStats], None] | None = None, async_save: bool = True,
                 read_only: bool = False) -> None:
        if keep_last < 2:
            raise ValueError("keep_last must be >= 2: the previous checkpoint stays while a save is in flight")
        self.root = Path(root)
        self.keep_last = keep_last
        self.read_only = read_only
        self._on_saved = on_saved
        self._callback_lock = threading.Lock()
        self._async = async_save
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[SaveStats] | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._lock_fd: int | None = None
        if not read_only:
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

    def tier_dir(self, tier: str) -> Path:
        if tier not in TIERS:
            raise ValueError(f"unknown checkpoint tier {tier!r}; expected one of {TIERS}")
        return self.root / tier

    def _writable(self) -> None:
        if self.read_only or self._lock_fd is None:
            raise RuntimeError("this checkpoint manager is read-only or closed")

    def _report(self, stats: SaveStats) -> None:
        if self._on_saved is not None:
            with self._callback_lock:
                self._on_saved(stats)

    # --- training tier ---

    def save_training_checkpoint(self, state: Mapping[str, Any], step: int, *,
                                 epoch: int | None = None) -> Future[SaveStats]:
        """Snapshots ``state`` and commits it in the background as ``training/<name>``.

        Policy: one save in flight. If the previous save is still writing, this call waits for it
        (and re-raises its error, if it failed) before taking the snapshot. After the commit the
        ``latest`` pointer is replaced and checkpoints beyond ``keep_last`` are deleted.

        Returns:
            A future of the :class:`SaveStats`; already resolved when ``async_save=False``.
        """
        self._writable()
        started = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - started
        snapshot = snapshot_state(state, self._buffers)
        name = training_checkpoint_name(step, epoch)
        meta = {"tier": "training", "step": step, "epoch": epoch}

        def write(blocking_s: float | None) -> SaveStats:
            t0 = time.perf_counter()
            written = commit_checkpoint(self.tier_dir("training"), name, snapshot.writers(), meta, replace=True)
            write_pointer(self.tier_dir("training"), LATEST, {"name": name})
            self.prune("training", self.keep_last)
            if blocking_s is None:  # synchronous: the caller was held for the write too
                blocking_s, background = time.perf_counter() - started, 0.0
            else:
                background = time.perf_counter() - t0
            stats = SaveStats("training", name, step, blocking_s, waited, background, written)
            self._report(stats)
            return stats

        if not self._async:
            done: Future[SaveStats] = Future()
            done.set_result(write(None))
            return done
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending = self._executor.submit(write, time.perf_counter() - started)
        return self._pending

    def wait(self) -> SaveStats | None:
        """Blocks until the save in flight is committed; re-raises its error if it failed."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        """Waits for the save in flight (raising its error) and releases the root."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

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
        and listed in ``skipped``.

        This may be newer than :meth:`latest` by one checkpoint: a crash between a commit and the
        pointer update leaves a complete checkpoint the pointer does not name yet.

        Returns:
            None when the tier holds no checkpoint at all.

        Raises:
            CheckpointCorrupt: checkpoints exist but none verifies.
        """
        committed, rejected = scan_tier(self.tier_dir(tier))
        skipped = list(rejected)
        for name, _ in reversed(committed):
            try:
                state = self.load_checkpoint(tier, name)
            except CheckpointCorrupt as exc:
                skipped.append((name, str(exc)))
                continue
            for bad, reason in skipped:
                logger.warning("skipped checkpoint %s/%s: %s", tier, bad, reason)
            return LoadedCheckpoint(tier, name, state, skipped)
        if skipped:
            raise CheckpointCorrupt(f"no valid checkpoint in {self.tier_dir(tier)}: "
                                    + "; ".join(reason for _, reason in skipped))
        return None

    def resume_training(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                        generator: torch.Generator, scheduler: Any = None,
                        scaler: Any = None) -> ResumeResult | None:
        """Restores the newest valid training checkpoint into the given objects (see
        :meth:`load_latest_valid`); None when there is nothing to resume from."""
        loaded = self.load_latest_valid("training")
        if loaded is None:
            return None
        loop_state = restore_training_state(loaded.state, model, optimizer, generator=generator,
                                            scheduler=scheduler, scaler=scaler)
        return ResumeResult(loaded.name, loop_state, dict(loaded.state.get("extra") or {}), loaded.skipped)

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
        ``milestone.json`` sidecar holds metric, value, mode, epoch, step, run id and notes."""
        self._writable()
        if not _METRIC.fullmatch(metric):
            raise ValueError(f"metric name {metric!r} must match {_METRIC.pattern}")
        best = self.best(metric)
        if best is not None and best[2] != mode:
            raise ValueError(f"metric {metric!r} was saved with mode {best[2]!r}, not {mode!r}")
        if not is_improvement(best[1] if best else None, float(value), mode):
            return None
        started = time.perf_counter()
        snapshot = snapshot_state(state, {})
        sidecar = {"metric": metric, "value": float(value), "mode": mode, "epoch": epoch, "step": step,
                   "run_id": run_id, "notes": notes}
        writers = snapshot.writers()
        writers["milestone.json"] = lambda path: path.write_text(json.dumps(sidecar, indent=2, sort_keys=True))
        tier_dir = self.tier_dir("milestone")
        base = f"{metric}-epoch-{epoch:04d}-step-{step:08d}"
        name, n = base, 1
        while (tier_dir / name).exists():
            n += 1
            name = f"{base}-{n}"
        written = commit_checkpoint(tier_dir, name, writers, {"tier": "milestone", **sidecar})
        write_pointer(tier_dir, f"best_{metric}", {"name": name, "value": float(value), "mode": mode})
        stats = SaveStats("milestone", name, step, time.perf_counter() - started, 0.0, 0.0, written)
        self._report(stats)
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
        if not is_semver(version):
            raise InvalidVersion(f"production version {version!r} is not a semantic version (e.g. 1.4.0)")
        tier_dir = self.tier_dir("production")
        if (tier_dir / version).exists():
            raise CheckpointExists(f"production version {version} already exists; publish a new version")
        bad = [k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"production weights must map str to Tensor; offending keys: {bad[:5]}")
        started = time.perf_counter()
        snapshot = snapshot_state({"model": dict(weights)}, {})
        tensors = snapshot.groups.get("model.safetensors", {})
        config_json = json.dumps(dict(config), indent=2, sort_keys=True, allow_nan=False)
        card_json = json.dumps(dict(model_card), indent=2, sort_keys=True, allow_nan=False)
        from safetensors.torch import save_file

        writers = {"model.safetensors": lambda path: save_file(tensors, str(path)),
                   "config.json": lambda path: path.write_text(config_json),
                   "model_card.json": lambda path: path.write_text(card_json)}
        written = commit_checkpoint(tier_dir, version, writers, {"tier": "production", "version": version})
        write_pointer(tier_dir, LATEST, {"name": version})
        stats = SaveStats("production", version, None, time.perf_counter() - started, 0.0, 0.0, written)
        self._report(stats)
        return stats

    def load_production(self, version: str) -> ProductionCheckpoint:
        if not is_semver(version):
            raise InvalidVersion(f"production version {version!r} is not a semantic version (e.g. 1.4.0)")
        files, _ = self._load_files("production", version)
        return ProductionCheckpoint(version, files["model.safetensors"], files["config.json"],
                                    files["model_card.json"])

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

    def prune(self, tier: str, keep: int) -> list[str]:
        """Deletes the oldest committed checkpoints beyond ``keep``, never the one ``latest`` names.
        Returns the deleted names."""
        self._writable()
        names = self.list(tier)
        protected = self._pointer_target(tier, names)
        doomed = [n for n in names[:max(len(names) - keep, 0)] if n != protected]
        for name in doomed:
            remove_checkpoint(self.tier_dir(tier), name)
        return doomed

    def verify(self, tier: str, name: str) -> dict[str, Any]:
        """Checks every file's size and SHA-256; returns the manifest's metadata.

        Raises:
            CheckpointCorrupt: naming the file that is missing, truncated or altered.
        """
        return verify_checkpoint(self._checkpoint_dir(tier, name))["meta"]

    def describe(self, tier: str, name: str) -> dict[str, Any]:
        """The manifest's metadata (tier, step, metric, version...) without reading the files."""
        return read_manifest(self._checkpoint_dir(tier, name))["meta"]

    def load_checkpoint(self, tier: str, name: str) -> dict[str, Any]:
        """Verifies and loads a checkpoint: the saved state for training and milestone tiers;
        ``{file stem: contents}`` for a production one."""
        files, _ = self._load_files(tier, name)
        if STATE_JSON in files:
            return decode_state(files[STATE_JSON], files, self._checkpoint_dir(tier, name))
        return {Path(fname).stem: content for fname, content in files.items()}

    def _checkpoint_dir(self, tier: str, name: str) -> Path:
        if not name or name.startswith(".") or "/" in name or name != Path(name).name:
            raise ValueError(f"invalid checkpoint name {name!r}")
        return self.tier_dir(tier) / name

    def _load_files(self, tier: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        return load_files(self._checkpoint_dir(tier, name))


class CheckpointHook:
    """A :class:`ml.loop.LoopHooks` that saves training checkpoints from inside :func:`ml.loop.fit`:
    after a step when :func:`should_save` says so, and after every epoch when ``at_epoch_end``.

    Args:
        extra: called at each save; its dict is stored under ``"extra"`` (e.g. early-stopper state).
        clock: seconds, monotonic; injectable for tests.
    """

    def __init__(self, manager: CheckpointManager, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 generator: torch.Generator, scheduler: Any = None, scaler: Any = None,
                 every_steps: int | None = None, every_seconds: float | None = None,
                 at_epoch_end: bool = True, extra: Callable[[], Mapping[str, Any]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if every_steps is not None and every_steps < 1:
            raise ValueError("every_steps must be >= 1 or None")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError("every_seconds must be > 0 or None")
        self.manager, self.model, self.optimizer = manager, model, optimizer
        self.generator, self.scheduler, self.scaler = generator, scheduler, scaler
        self.every_steps, self.every_seconds, self.at_epoch_end = every_steps, every_seconds, at_epoch_end
        self._extra, self._clock = extra, clock
        self._last_save_time = clock()

    def on_step_end(self, state: LoopState, loss: float) -> None:
        now = self._clock()
        if should_save(state.global_step, self.every_steps, self._last_save_time, now, self.every_seconds):
            self._save(state, now)

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        if self.at_epoch_end:
            self._save(state, self._clock())

    def _save(self, state: LoopState, now: float) -> None:
        snapshot = training_state(self.model, self.optimizer, loop_state=state, generator=self.generator,
                                  scheduler=self.scheduler, scaler=self.scaler,
                                  extra=self._extra() if self._extra else None)
        self.manager.save_training_checkpoint(snapshot, state.global_step, epoch=state.epoch)
        self._last_save_time = now
