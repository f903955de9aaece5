"""Reading the checkpoint tiers: listing, pointers, verification and loading, with the fallback to
the newest checkpoint that verifies and the restore from an S3 mirror when the local copy is
missing. :class:`ml.checkpoint.manager.CheckpointManager` adds the writing side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ml.checkpoint.distributed import Dist, all_ok, broadcast_json, rank_files
from ml.checkpoint.policy import TIERS, is_improvement, is_semver
from ml.checkpoint.snapshot import decode_state
from ml.checkpoint.store import (
    STATE_JSON,
    CheckpointCorrupt,
    install_checkpoint,
    load_files,
    new_tmp_dir,
    pointer_names,
    read_manifest,
    read_pointer,
    scan_tier,
    verify_checkpoint,
)
from ml.errors import PipelineError
from ml.io import fsync_dir

__all__ = ["LATEST", "CheckpointReader", "InvalidVersion", "LoadedCheckpoint", "ProductionCheckpoint"]

logger = logging.getLogger(__name__)

LATEST = "latest"


class InvalidVersion(PipelineError):
    """A production version that is not a semantic version (MAJOR.MINOR.PATCH[-pre][+build])."""


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


class CheckpointReader:
    """Lists, verifies and loads the checkpoints of the three tiers under ``root``; never writes,
    except to restore a checkpoint from ``mirror`` into a writable subclass.

    Args:
        mirror: an :class:`ml.checkpoint.s3.S3Mirror` to restore from when a checkpoint is missing
            locally (writable managers only).
        dist: this process's place in a ``torch.distributed`` group, or None.
        read_only: False only for the writing subclass, which then holds the root's lock.
    """

    def __init__(self, root: str | Path, *, mirror: Any = None, dist: Dist | None = None,
                 read_only: bool = True) -> None:
        self.root = Path(root)
        self.mirror = mirror
        self.read_only = read_only
        self._dist = dist
        self._closed = False
        self._lock_fd: int | None = None

    @property
    def rank(self) -> int:
        return self._dist.rank if self._dist is not None else 0

    @property
    def world_size(self) -> int:
        return self._dist.world_size if self._dist is not None else 1

    @property
    def is_distributed(self) -> bool:
        return self._dist is not None

    def tier_dir(self, tier: str) -> Path:
        if tier not in TIERS:
            raise ValueError(f"unknown checkpoint tier {tier!r}; expected one of {TIERS}")
        return self.root / tier

    def _writable(self) -> None:
        if self.read_only or self._closed or (self.rank == 0 and self._lock_fd is None):
            raise RuntimeError("this checkpoint manager is read-only or closed")

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
        choice = broadcast_json(self._dist, {"name": loaded.name if loaded else None,
                                              "error": str(error) if error else None})
        if error is not None:
            all_ok(self._dist, False)
            raise error
        if choice["error"] is not None:
            all_ok(self._dist, False)
            raise CheckpointCorrupt(f"rank 0: {choice['error']}")
        failure: CheckpointCorrupt | None = None
        if choice["name"] is not None and loaded is None:
            try:
                loaded = LoadedCheckpoint(tier, choice["name"], self.load_checkpoint(tier, choice["name"]))
            except CheckpointCorrupt as exc:
                failure = exc
        if not all_ok(self._dist, failure is None):
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

    def load_production(self, version: str) -> ProductionCheckpoint:
        if not is_semver(version):
            raise InvalidVersion(f"production version {version!r} is not a semantic version (e.g. 1.4.0)")
        files, _ = self._load_files("production", version)
        return ProductionCheckpoint(version, files["model.safetensors"], files["config.json"],
                                    files["model_card.json"])

    def list_remote(self, tier: str) -> list[str]:
        """Committed checkpoints in the mirror, oldest first; [] without a mirror."""
        self.tier_dir(tier)
        return [name for name, _ in self.mirror.list(tier)[0]] if self.mirror is not None else []

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
