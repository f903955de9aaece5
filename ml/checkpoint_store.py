"""Checkpoints on disk: the format, the commit protocol and verification.

A checkpoint is a directory ``<tier_root>/<name>/`` of safetensors and JSON files plus a
``manifest.json`` that lists every file with its size and SHA-256. It is built in a hidden
``.tmp-<name>-<random>`` directory beside it, every file and the manifest are fsynced, and only then
is the directory renamed to its name and the tier directory fsynced. A directory without a valid
manifest is never listed or loaded, so a crash at any moment leaves either the whole checkpoint or
nothing. Nothing here unpickles: tensors are read with safetensors, everything else with ``json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ml.errors import PipelineError
from ml.io import atomic_write, fsync_dir

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_JSON = "state.json"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
LOADABLE_SUFFIXES = (".safetensors", ".json")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
# Marker keys of the JSON tree; a dict that uses one of them as a key is stored as pairs instead.
_TENSOR, _TUPLE, _PAIRS = "__tensor__", "__tuple__", "__pairs__"
_MARKERS = frozenset({_TENSOR, _TUPLE, _PAIRS})


class CheckpointCorrupt(PipelineError):
    """A checkpoint file is missing, truncated, altered, or in a format that is never loaded."""


class CheckpointExists(PipelineError):
    """A checkpoint of that name is already committed and may not be replaced."""


def is_valid_name(name: str) -> bool:
    """Checkpoint and file names: one path component, never hidden, never a temporary."""
    return bool(_NAME.fullmatch(name))


# --- state <-> (JSON tree, tensors) -------------------------------------------------------------


@dataclass
class Snapshot:
    """A state split into a JSON tree and CPU tensors grouped by the file they go to."""

    tree_json: bytes
    groups: dict[str, dict[str, torch.Tensor]]

    def writers(self) -> dict[str, Callable[[Path], None]]:
        from safetensors.torch import save_file

        out: dict[str, Callable[[Path], None]] = {
            fname: (lambda path, tensors=tensors: save_file(tensors, str(path)))
            for fname, tensors in self.groups.items()
        }
        out[STATE_JSON] = lambda path: path.write_bytes(self.tree_json)
        return out


def _group_file(key: Any, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", str(key)).lstrip(".") or "tensors"
    fname, n = f"{stem}.safetensors", 1
    while fname in taken:
        n += 1
        fname = f"{stem}-{n}.safetensors"
    return fname


def snapshot_state(state: Mapping[str, Any], buffers: dict[str, torch.Tensor]) -> Snapshot:
    """Copies ``state`` into CPU memory as a :class:`Snapshot`.

    Each top-level key's tensors go to one ``<key>.safetensors`` file; every other leaf (int,
    float, str, bool, None, list, tuple, dict with any keys) goes into the JSON tree, where a tensor
    is a ``{"__tensor__": [file, key]}`` reference.

    Args:
        state: nested mappings/lists whose leaves are tensors or JSON scalars.
        buffers: host tensors from the previous snapshot, keyed by tensor path. A tensor is copied
            into its buffer when shape and dtype still match, otherwise a new one replaces it, so
            repeated snapshots of the same state hold one host copy. Pass ``{}`` for a one-off.

    Raises:
        TypeError: a leaf that is neither a tensor nor JSON-able, naming its path.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[str] = set()
    cuda_used = False

    def tensor_ref(t: torch.Tensor, fname: str, path: str) -> dict[str, list[str]]:
        nonlocal cuda_used
        tensors = groups.setdefault(fname, {})
        key, n = path or "tensor", 1
        while key in tensors:
            n += 1
            key = f"{path}#{n}"
        buf_key = f"{fname}/{key}"
        buf = buffers.get(buf_key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            buffers[buf_key] = buf
        cuda_used |= t.is_cuda
        buf.copy_(t.detach(), non_blocking=t.is_cuda)
        tensors[key] = buf
        return {_TENSOR: [fname, key]}

    def encode(obj: Any, fname: str, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return tensor_ref(obj, fname, path)
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) and k not in _MARKERS for k in obj):
                return {k: encode(v, fname, f"{path}.{k}" if path else k) for k, v in obj.items()}
            return {_PAIRS: [[encode(k, fname, path), encode(v, fname, f"{path}.{k}" if path else str(k))]
                             for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {_TUPLE: [encode(v, fname, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [encode(v, fname, f"{path}.{i}") for i, v in enumerate(obj)]
        where = f"{top}.{path}" if path else top
        raise TypeError(f"checkpoint state at {where!r}: cannot store a {type(obj).__name__}")

    tree, top = {}, ""
    for top, value in state.items():
        if not isinstance(top, str):
            raise TypeError(f"checkpoint state: top-level keys must be str, got {top!r}")
        fname = _group_file(top, seen)
        seen.add(fname)
        tree[top] = encode(value, fname, "")
    if cuda_used:
        torch.cuda.synchronize()  # the non_blocking copies must land before the writer reads them
    return Snapshot(json.dumps(tree, sort_keys=True).encode(), groups)


def decode_state(tree: Any, files: Mapping[str, Any], where: Path) -> Any:
    """Rebuilds the state from its JSON tree and the loaded safetensors files."""
    if isinstance(tree, list):
        return [decode_state(v, files, where) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1 and next(iter(tree)) in _MARKERS:
        (marker, payload), = tree.items()
        if marker == _TUPLE:
            return tuple(decode_state(v, files, where) for v in payload)
        if marker == _PAIRS:
            return {decode_state(k, files, where): decode_state(v, files, where) for k, v in payload}
        fname, key = payload
        try:
            return files[fname][key]
        except (KeyError, TypeError):
            raise CheckpointCorrupt(f"{where / STATE_JSON}: refers to tensor {key!r} missing from {fname}") from None
    return {k: decode_state(v, files, where) for k, v in tree.items()}


# --- manifest --------------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def encode_manifest(body: Mapping[str, Any]) -> bytes:
    """The manifest carries a digest of its own body, and is written in one canonical form, so
    that a flipped byte in the manifest itself is caught and reported as the manifest's."""
    return _canonical({"body": body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()})


def decode_manifest(raw: bytes, where: Path) -> dict[str, Any]:
    """Parses and checks a manifest; raises :class:`CheckpointCorrupt` naming ``where``."""
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
    for fname, entry in files.items():
        if not (is_valid_name(fname) and fname != MANIFEST and fname.endswith(LOADABLE_SUFFIXES)):
            raise CheckpointCorrupt(f"{where}: lists {fname!r}; only .safetensors and .json files are loaded")
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256_HEX.fullmatch(entry["sha256"])):
            raise CheckpointCorrupt(f"{where}: malformed entry for {fname!r}")
    if body["name"] != where.parent.name:
        raise CheckpointCorrupt(f"{where}: written for {body['name']!r}, found under {where.parent.name!r}")
    return body


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{path}: missing (checkpoint never committed)") from None
    return decode_manifest(raw, path)


# --- commit ----------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size_and_digest(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def commit_checkpoint(tier_root: Path, name: str, writers: Mapping[str, Callable[[Path], None]],
                      meta: Mapping[str, Any], *, replace: bool = False) -> int:
    """Writes a checkpoint and commits it; returns the bytes written.

    Each ``writers[fname](path)`` writes one file into the temporary directory. The files are
    fsynced and hashed (read back, so the digest is of the bytes on disk), the manifest is written
    and fsynced last, the directory is renamed to ``name`` and ``tier_root`` is fsynced.

    Args:
        replace: whether an existing checkpoint of the same name is swapped out (training tier,
            e.g. after resuming from an older one); otherwise :class:`CheckpointExists`.
    """
    if not is_valid_name(name):
        raise ValueError(f"invalid checkpoint name {name!r}")
    for fname in writers:
        if not (is_valid_name(fname) and fname != MANIFEST and fname.endswith(LOADABLE_SUFFIXES)):
            raise ValueError(f"invalid checkpoint file name {fname!r}")
    final = tier_root / name
    if final.exists() and not replace:
        raise CheckpointExists(f"{final} already exists and is never overwritten")
    tier_root.mkdir(parents=True, exist_ok=True)
    tmp = tier_root / f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    old: Path | None = None
    try:
        files, total = {}, 0
        for fname, write in writers.items():
            write(tmp / fname)
            _fsync_file(tmp / fname)
            size, digest = _size_and_digest(tmp / fname)
            files[fname] = {"size": size, "sha256": digest}
            total += size
        manifest = encode_manifest({"format": FORMAT_VERSION, "name": name, "created_ns": time.time_ns(),
                                    "files": files, "meta": dict(meta)})
        _write_durably(tmp / MANIFEST, manifest)
        fsync_dir(tmp)
        if final.exists():  # only with replace=True; the old one goes where start-up cleanup finds it
            old = tier_root / f"{TMP_PREFIX}{name}-old-{secrets.token_hex(4)}"
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return total + len(manifest)


# --- reading ---------------------------------------------------------------------------------------


def verify_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """Checks every listed file's size and SHA-256; returns the manifest body.

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
            if _size_and_digest(path)[1] != entry["sha256"]:
                raise CheckpointCorrupt(f"{path}: SHA-256 differs from the manifest (altered)")
        except FileNotFoundError:
            raise CheckpointCorrupt(f"{path}: missing") from None
    return body


def load_files(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads each listed file once, checks its size and digest on those very bytes, then parses it
    (safetensors -> dict of tensors, JSON -> object). Returns ``(files, manifest body)``."""
    from safetensors.torch import load

    body = read_manifest(ckpt_dir)
    out: dict[str, Any] = {}
    for fname, entry in body["files"].items():
        path = ckpt_dir / fname
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointCorrupt(f"{path}: missing") from None
        if len(raw) != entry["size"]:
            raise CheckpointCorrupt(f"{path}: size {len(raw)} != {entry['size']} in the manifest "
                                    "(truncated or altered)")
        if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise CheckpointCorrupt(f"{path}: SHA-256 differs from the manifest (altered)")
        try:
            out[fname] = load(raw) if fname.endswith(".safetensors") else json.loads(raw)
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise CheckpointCorrupt(f"{path}: cannot be parsed as {Path(fname).suffix[1:]}: {exc}") from None
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


def write_pointer(tier_root: Path, pointer: str, payload: Mapping[str, Any]) -> None:
    """Replaces the pointer file atomically and durably (fsynced file, rename, fsynced directory)."""
    data = json.dumps(dict(payload), sort_keys=True, allow_nan=False).encode()
    atomic_write(tier_root / pointer, lambda tmp: _write_durably(tmp, data))
    fsync_dir(tier_root)


def read_pointer(tier_root: Path, pointer: str) -> dict[str, Any] | None:
    """The pointer's payload, or None when it is missing or unreadable (callers then fall back to
    the manifests, which are the ground truth)."""
    try:
        payload = json.loads((tier_root / pointer).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        logger.warning("ignoring unreadable checkpoint pointer %s", tier_root / pointer)
        return None
    return payload if isinstance(payload, dict) and isinstance(payload.get("name"), str) else None
