"""Checkpoints on disk: the format, the commit protocol, verification and pointers.

A checkpoint is a directory ``<tier_root>/<name>/`` of safetensors and JSON files plus a
``manifest.json`` that lists every file with its size and checksum (see
:mod:`ml.checkpoint.checksums`), both of the bytes as stored. It is built in a hidden
``.tmp-<name>-<random>`` directory beside it, every file and the manifest are fsynced, and only then
is the directory renamed to its name and the tier directory fsynced. A directory without a valid
manifest is never listed or loaded, so a crash at any moment leaves either the whole checkpoint or
nothing. Nothing here unpickles: tensors are read with safetensors, everything else with ``json``.
A ``.safetensors.zst`` file is a zstd-compressed safetensors file; its digest is of the compressed
bytes, checked before it is decompressed. Each tier's pointers (``latest``, ``best_<metric>``) are
small JSON files replaced atomically; the manifests stay the ground truth.
"""

from __future__ import annotations

import json
import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.checkpoint.checksums import (
    CHECKSUMS,
    checksum_label,
    entry_checksum,
    file_digest,
    is_checksum_hex,
    new_digest,
)
from ml.checkpoint.writers import IdleThreads, IOTimes, write_durably
from ml.errors import PipelineError
from ml.io import atomic_write, fsync_dir, fsync_path

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_JSON = "state.json"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
ZSTD_SUFFIX = ".zst"
LOADABLE_SUFFIXES = (".safetensors", ".json", ".safetensors" + ZSTD_SUFFIX)
COMPRESSIONS = ("none", "zstd")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")


class CheckpointCorrupt(PipelineError):
    """A checkpoint file is missing, truncated, altered, or in a format that is never loaded."""


class CheckpointExists(PipelineError):
    """A checkpoint of that name is already committed and may not be replaced."""


def is_valid_name(name: str) -> bool:
    """Checkpoint and file names: one path component, never hidden, never a temporary."""
    return bool(_NAME.fullmatch(name))


def logical_name(fname: str) -> str:
    """The name a file is referred to by in the JSON tree: ``x.safetensors.zst`` -> ``x.safetensors``."""
    return fname[:-len(ZSTD_SUFFIX)] if fname.endswith(ZSTD_SUFFIX) else fname



# --- manifest --------------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def encode_manifest(body: Mapping[str, Any]) -> bytes:
    """The manifest carries a digest of its own body, and is written in one canonical form, so
    that a flipped byte in the manifest itself is caught and reported as the manifest's."""
    return _canonical({"body": body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()})


def decode_manifest(raw: bytes, where: Path | str, name: str | None = None) -> dict[str, Any]:
    """Parses and checks a manifest; raises :class:`CheckpointCorrupt` naming ``where``.

    Args:
        where: the manifest's location, for messages (a path or an ``s3://`` URL).
        name: the checkpoint it must belong to; by default the name of ``where``'s parent.
    """
    expected = name if name is not None else Path(str(where)).parent.name
    try:
        outer = json.loads(raw)
        body = outer["body"]
        ok = (_canonical(outer) == raw
              and hashlib.sha256(_canonical(body)).hexdigest() == outer["sha256"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointCorrupt(f"{where}: not a readable manifest") from None
    if not ok:
        raise CheckpointCorrupt(f"{where}: manifest digest mismatch (altered)")
    files = body.get("files")
    if (body.get("format") != FORMAT_VERSION or not isinstance(body.get("name"), str)
            or not isinstance(body.get("created_ns"), int) or not isinstance(body.get("meta"), dict)
            or not isinstance(files, dict)):
        raise CheckpointCorrupt(f"{where}: manifest of an unknown format")
    logical: set[str] = set()
    for fname, entry in files.items():
        if not (is_valid_name(fname) and fname != MANIFEST and fname.endswith(LOADABLE_SUFFIXES)):
            raise CheckpointCorrupt(f"{where}: lists {fname!r}; only .safetensors, .safetensors.zst and .json "
                                    "files are loaded")
        sums = [a for a in CHECKSUMS if isinstance(entry, dict) and a in entry]
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
                and len(sums) == 1 and is_checksum_hex(sums[0], entry[sums[0]])):
            raise CheckpointCorrupt(f"{where}: malformed entry for {fname!r}")
        if fname.endswith(ZSTD_SUFFIX) and not (isinstance(entry.get("raw_size"), int) and entry["raw_size"] >= 0):
            raise CheckpointCorrupt(f"{where}: malformed entry for {fname!r} (no raw_size)")
        if logical_name(fname) in logical:
            raise CheckpointCorrupt(f"{where}: lists {logical_name(fname)!r} twice")
        logical.add(logical_name(fname))
    if body["name"] != expected:
        raise CheckpointCorrupt(f"{where}: written for {body['name']!r}, found under {expected!r}")
    return body


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{path}: missing (checkpoint never committed)") from None
    return decode_manifest(raw, path)


# --- commit ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommitResult:
    bytes_written: int
    times: IOTimes


def install_checkpoint(tier_root: Path, tmp: Path, name: str, *, replace: bool) -> None:
    """Renames the complete, fsynced directory ``tmp`` to ``tier_root/name`` and fsyncs the tier.
    With ``replace``, an existing checkpoint of that name is moved aside first and deleted after."""
    final = tier_root / name
    old: Path | None = None
    if final.exists():
        if not replace:
            raise CheckpointExists(f"{final} already exists and is never overwritten")
        old = tier_root / f"{TMP_PREFIX}{name}-old-{secrets.token_hex(4)}"  # start-up cleanup finds it
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if old is not None:
            os.rename(old, final)
            old = None
        if final.exists():
            raise CheckpointExists(f"{final} already exists and is never overwritten") from exc
        raise
    fsync_dir(tier_root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def new_tmp_dir(tier_root: Path, name: str) -> Path:
    tier_root.mkdir(parents=True, exist_ok=True)
    tmp = tier_root / f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def commit_checkpoint(tier_root: Path, name: str, writers: Mapping[str, Callable[[Path], dict[str, Any] | None]],
                      meta: Mapping[str, Any], *, replace: bool = False, workers: int = 2,
                      times: IOTimes | None = None, idle: IdleThreads | None = None) -> CommitResult:
    """Writes a checkpoint and commits it.

    Each ``writers[fname](path)`` writes one file into the temporary directory, fsyncs it and
    returns its manifest entry (size and checksum of the bytes it wrote); a writer that returns None
    has its file fsynced and hashed (SHA-256) here, read back. Up to ``workers`` files are written at once.
    Then the manifest is written and fsynced last, the directory is renamed to ``name`` and
    ``tier_root`` is fsynced.

    Args:
        replace: whether an existing checkpoint of the same name is swapped out (training tier,
            e.g. after resuming from an older one); otherwise :class:`CheckpointExists`.
        idle: the files are written by threads that enter it (idle scheduling priority until it
            is restored); the manifest and the renames stay in the calling thread.
    """
    if not is_valid_name(name):
        raise ValueError(f"invalid checkpoint name {name!r}")
    for fname in writers:
        if not (is_valid_name(fname) and fname != MANIFEST and fname.endswith(LOADABLE_SUFFIXES)):
            raise ValueError(f"invalid checkpoint file name {fname!r}")
    final = tier_root / name
    if final.exists() and not replace:
        raise CheckpointExists(f"{final} already exists and is never overwritten")
    times = times or IOTimes()
    tmp = new_tmp_dir(tier_root, name)
    try:
        def write_one(fname: str) -> dict[str, Any]:
            entry = writers[fname](tmp / fname)
            if entry is None:
                started = time.perf_counter()
                fsync_path(tmp / fname)
                times.add("fsync_s", time.perf_counter() - started)
                started = time.perf_counter()
                size, digest = file_digest(tmp / fname)
                times.add("checksum_s", time.perf_counter() - started)
                entry = {"size": size, "sha256": digest}
            return entry

        names = list(writers)
        if idle is not None or (workers > 1 and len(names) > 1):
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(names))), thread_name_prefix="checkpoint-file",
                                    initializer=idle.enter if idle is not None else None) as pool:
                entries = dict(zip(names, pool.map(write_one, names)))
        else:
            entries = {fname: write_one(fname) for fname in names}
        files = {fname: entries[fname] for fname in sorted(entries)}
        manifest = encode_manifest({"format": FORMAT_VERSION, "name": name, "created_ns": time.time_ns(),
                                    "files": files, "meta": dict(meta)})
        started = time.perf_counter()
        write_durably(tmp / MANIFEST, manifest)
        fsync_dir(tmp)
        install_checkpoint(tier_root, tmp, name, replace=replace)
        times.add("fsync_s", time.perf_counter() - started)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CommitResult(sum(e["size"] for e in files.values()) + len(manifest), times)


# --- reading ---------------------------------------------------------------------------------------


def verify_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """Checks every listed file's size and checksum; returns the manifest body.

    Raises:
        CheckpointCorrupt: naming the first file that is missing, truncated or altered.
    """
    body = read_manifest(ckpt_dir)
    for fname, entry in body["files"].items():
        path = ckpt_dir / fname
        try:
            if path.stat().st_size != entry["size"]:
                raise CheckpointCorrupt(f"{path}: size {path.stat().st_size} != {entry['size']} in the "
                                        "manifest (truncated or altered)")
            algorithm, expected = entry_checksum(entry)
            if file_digest(path, algorithm)[1] != expected:
                raise CheckpointCorrupt(f"{path}: {checksum_label(algorithm)} differs from the manifest (altered)")
        except FileNotFoundError:
            raise CheckpointCorrupt(f"{path}: missing") from None
    return body


def check_bytes(raw: bytes, entry: Mapping[str, Any], where: Path | str) -> None:
    """Raises :class:`CheckpointCorrupt` unless ``raw`` has the entry's size and checksum."""
    if len(raw) != entry["size"]:
        raise CheckpointCorrupt(f"{where}: size {len(raw)} != {entry['size']} in the manifest (truncated or altered)")
    check_digest(new_digest(entry_checksum(entry)[0], raw).hexdigest(), entry, where)


def check_digest(digest: str, entry: Mapping[str, Any], where: Path | str) -> None:
    """Raises :class:`CheckpointCorrupt` unless ``digest`` is the entry's checksum."""
    algorithm, expected = entry_checksum(entry)
    if digest != expected:
        raise CheckpointCorrupt(f"{where}: {checksum_label(algorithm)} differs from the manifest (altered)")


def parse_file(fname: str, raw: bytes, entry: Mapping[str, Any], where: Path | str) -> Any:
    """A verified file's contents: safetensors -> dict of tensors, JSON -> object; a ``.zst`` file
    is decompressed first (to at most its ``raw_size``)."""
    from safetensors.torch import load

    if fname.endswith(ZSTD_SUFFIX):
        import zstandard

        try:
            declared = zstandard.frame_content_size(raw)
            if declared not in (-1, entry["raw_size"]):  # refused before anything that size is allocated
                raise CheckpointCorrupt(f"{where}: frame declares {declared} bytes, {entry['raw_size']} in the "
                                        "manifest")
            raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=max(entry["raw_size"], 1))
        except zstandard.ZstdError as exc:
            raise CheckpointCorrupt(f"{where}: cannot be decompressed: {exc}") from None
        if len(raw) != entry["raw_size"]:
            raise CheckpointCorrupt(f"{where}: decompressed to {len(raw)} bytes, {entry['raw_size']} in the manifest")
    try:
        return load(raw) if logical_name(fname).endswith(".safetensors") else json.loads(raw)
    except Exception as exc:  # safetensors raises its own error type for a bad header
        kind = Path(logical_name(fname)).suffix[1:]
        raise CheckpointCorrupt(f"{where}: cannot be parsed as {kind}: {exc}") from None


def load_files(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads each listed file once, checks its size and digest on those very bytes, then parses it
    (see :func:`parse_file`). Returns ``(files by logical name, manifest body)``."""
    body = read_manifest(ckpt_dir)
    out: dict[str, Any] = {}
    for fname, entry in body["files"].items():
        path = ckpt_dir / fname
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointCorrupt(f"{path}: missing") from None
        check_bytes(raw, entry, path)
        out[logical_name(fname)] = parse_file(fname, raw, entry, path)
        del raw
    return out, body


def scan_tier(tier_root: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, str]]]:
    """Committed checkpoints ``(name, manifest body)`` oldest first (by commit time), and the
    visible directories that are not committed checkpoints ``(name, reason)``."""
    committed, rejected = [], []
    if not tier_root.is_dir():
        return committed, rejected
    for entry in tier_root.iterdir():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            committed.append((entry.name, read_manifest(entry)))
        except CheckpointCorrupt as exc:
            rejected.append((entry.name, str(exc)))
    committed.sort(key=lambda item: (item[1]["created_ns"], item[0]))
    return committed, sorted(rejected)


def remove_checkpoint(tier_root: Path, name: str) -> None:
    """Hides the checkpoint with one rename before deleting it, so a crash mid-delete never leaves
    a half-deleted directory that still carries its manifest."""
    doomed = tier_root / f"{TMP_PREFIX}deleting-{name}-{secrets.token_hex(4)}"
    os.rename(tier_root / name, doomed)
    fsync_dir(tier_root)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_leftovers(tier_root: Path) -> list[str]:
    """Removes temporaries a crashed writer left: ``.tmp-*`` directories and pointer temp files."""
    removed = []
    for entry in tier_root.iterdir() if tier_root.is_dir() else ():
        if entry.name.startswith(TMP_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            entry.unlink(missing_ok=True)
        else:
            continue
        removed.append(entry.name)
    if removed:
        logger.info("removed leftover checkpoint temporaries in %s: %s", tier_root, removed)
    return removed


# --- pointers --------------------------------------------------------------------------------------


def encode_pointer(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(payload), sort_keys=True, allow_nan=False).encode()


def decode_pointer(raw: bytes, where: Path | str) -> dict[str, Any] | None:
    try:
        payload = json.loads(raw)
    except ValueError:
        logger.warning("ignoring unreadable checkpoint pointer %s", where)
        return None
    return payload if isinstance(payload, dict) and isinstance(payload.get("name"), str) else None


def write_pointer(tier_root: Path, pointer: str, payload: Mapping[str, Any]) -> None:
    """Replaces the pointer file atomically and durably (fsynced file, rename, fsynced directory)."""
    data = encode_pointer(payload)
    atomic_write(tier_root / pointer, lambda tmp: write_durably(tmp, data))
    fsync_dir(tier_root)


def read_pointer(tier_root: Path, pointer: str) -> dict[str, Any] | None:
    """The pointer's payload, or None when it is missing or unreadable (callers then fall back to
    the manifests, which are the ground truth)."""
    try:
        raw = (tier_root / pointer).read_bytes()
    except FileNotFoundError:
        return None
    return decode_pointer(raw, tier_root / pointer)


def pointer_names(tier_root: Path) -> list[str]:
    """The pointer files of a tier (``latest``, ``best_<metric>``)."""
    if not tier_root.is_dir():
        return []
    return sorted(p.name for p in tier_root.iterdir() if p.is_file() and not p.name.startswith("."))
