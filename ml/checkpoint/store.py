"""Checkpoints on disk: the format, the commit protocol and verification.

A checkpoint is a directory ``<tier_root>/<name>/`` of safetensors and JSON files plus a
``manifest.json`` that lists every file with its size and checksum (SHA-256, or CRC-32 where chosen
for speed), both of the bytes as stored. It is
built in a hidden ``.tmp-<name>-<random>`` directory beside it, every file and the manifest are
fsynced, and only then is the directory renamed to its name and the tier directory fsynced. A
directory without a valid manifest is never listed or loaded, so a crash at any moment leaves either
the whole checkpoint or nothing. Nothing here unpickles: tensors are read with safetensors,
everything else with ``json``. A ``.safetensors.zst`` file is a zstd-compressed safetensors file; its
digest is of the compressed bytes, checked before it is decompressed.

Saving goes through a :class:`Snapshot`: each safetensors file is laid out in a page-aligned host
buffer exactly as it will be on disk (header, then the tensor bytes), the tensors are copied into it
(CUDA tensors with asynchronous device-to-host copies into page-locked memory), and the writer then
hashes and writes that buffer in one pass, hashing in one thread while the write runs in another,
with ``O_DIRECT`` for large files where the filesystem allows it, so the data is copied once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.errors import PipelineError
from ml.io import atomic_write, fsync_dir

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_JSON = "state.json"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
ZSTD_SUFFIX = ".zst"
LOADABLE_SUFFIXES = (".safetensors", ".json", ".safetensors" + ZSTD_SUFFIX)
COMPRESSIONS = ("none", "zstd")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")
CHECKSUMS = ("sha256", "crc32")
_CHECKSUM_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "crc32": re.compile(r"[0-9a-f]{8}")}
_CHECKSUM_LABEL = {"sha256": "SHA-256", "crc32": "CRC-32"}
_CHUNK = 1 << 20
_PAGE = mmap.PAGESIZE
_DIRECT_MIN = 4 << 20  # files at least this large start their data on a page boundary and bypass the page cache
_IO_CHUNK = 64 << 20  # bytes per write call
_ZSTD_CHUNK = 4 << 20  # bytes handed to the compressor at a time
# Marker keys of the JSON tree; a dict that uses one of them as a key is stored as pairs instead.
_TENSOR, _TUPLE, _PAIRS = "__tensor__", "__tuple__", "__pairs__"
_MARKERS = frozenset({_TENSOR, _TUPLE, _PAIRS})
_ST_RESERVED = "__metadata__"

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
}
for _attr, _code in (("uint64", "U64"), ("uint32", "U32"), ("uint16", "U16"), ("float8_e4m3fn", "F8_E4M3"),
                     ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
                     ("float8_e5m2fnuz", "F8_E5M2FNUZ")):
    if hasattr(torch, _attr):
        _ST_DTYPES[getattr(torch, _attr)] = _code


class CheckpointCorrupt(PipelineError):
    """A checkpoint file is missing, truncated, altered, or in a format that is never loaded."""


class CheckpointExists(PipelineError):
    """A checkpoint of that name is already committed and may not be replaced."""


def is_valid_name(name: str) -> bool:
    """Checkpoint and file names: one path component, never hidden, never a temporary."""
    return bool(_NAME.fullmatch(name))


class _Crc32:
    """zlib's CRC-32 with hashlib's interface (it releases the GIL on large buffers, like hashlib)."""

    def __init__(self, data: bytes | memoryview = b"") -> None:
        self._value = zlib.crc32(data)

    def update(self, data: bytes | memoryview) -> None:
        self._value = zlib.crc32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


def new_digest(algorithm: str, data: bytes | memoryview = b"") -> Any:
    """A running checksum of one of :data:`CHECKSUMS` (hashlib interface)."""
    if algorithm == "sha256":
        return hashlib.sha256(data)
    if algorithm == "crc32":
        return _Crc32(data)
    raise ValueError(f"checksum must be one of {', '.join(CHECKSUMS)}; got {algorithm!r}")


def entry_checksum(entry: Mapping[str, Any]) -> tuple[str, str]:
    """``(algorithm, hex digest)`` of a manifest entry."""
    for algorithm in CHECKSUMS:
        if algorithm in entry:
            return algorithm, entry[algorithm]
    raise KeyError("no checksum")


def logical_name(fname: str) -> str:
    """The name a file is referred to by in the JSON tree: ``x.safetensors.zst`` -> ``x.safetensors``."""
    return fname[:-len(ZSTD_SUFFIX)] if fname.endswith(ZSTD_SUFFIX) else fname


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


# --- host memory -----------------------------------------------------------------------------------


def _cuda_host_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class HostBuffer:
    """Page-aligned anonymous memory, reused from one snapshot to the next. ``pinned`` buffers are
    page-locked with ``cudaHostRegister`` (exact size, where the caching host allocator would round
    up to a power of two) so device-to-host copies into them run asynchronously."""

    def __init__(self, nbytes: int, pinned: bool = False) -> None:
        self.capacity = max(_round_up(nbytes, _PAGE), _PAGE)
        self._map = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.array = np.frombuffer(self._map, dtype=np.uint8)
        self.tensor = torch.from_numpy(self.array)
        self.pinned = False
        if pinned:
            ptr = self.tensor.data_ptr()
            status = torch.cuda.cudart().cudaHostRegister(ptr, self.capacity, 1)  # cudaHostRegisterPortable
            if int(status) != 0:
                raise RuntimeError(f"cudaHostRegister of {self.capacity} bytes failed with status {int(status)}")
            self.pinned = True
            weakref.finalize(self, _cuda_host_unregister, ptr)

    def fits(self, nbytes: int, pinned: bool) -> bool:
        return nbytes <= self.capacity and (self.pinned or not pinned)


# --- state <-> (JSON tree, safetensors file images) -----------------------------------------------


@dataclass
class FileImage:
    """One safetensors file laid out in host memory exactly as it goes to disk."""

    fname: str
    size: int
    buffer: HostBuffer
    direct: bool  # large enough, and laid out, to be written with O_DIRECT

    def view(self) -> memoryview:
        return memoryview(self.buffer.array)[:self.size]

    def padded_view(self) -> memoryview:
        """The image rounded up to whole pages, for O_DIRECT writes; the file is truncated to
        ``size`` after the write."""
        return memoryview(self.buffer.array)[:_round_up(self.size, _PAGE)]


@dataclass
class _Slot:
    """A copy left to the writer thread: ``source`` (the tensor's bytes) into ``image`` at ``offset``."""

    source: torch.Tensor
    image: FileImage
    offset: int


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


def _layout(entries: list[tuple[str, torch.Tensor]]) -> tuple[bytes, list[int], bool, int]:
    """The safetensors header for ``entries``, each tensor's offset in the file, whether the file
    is written with O_DIRECT, and the file size. Tensors are placed widest dtype first, so each one
    starts at a multiple of its element size; a large file's header is padded with spaces (valid
    JSON whitespace) so its data starts on a page boundary."""
    order = sorted(range(len(entries)), key=lambda i: -entries[i][1].element_size())
    header: dict[str, Any] = {}
    offsets = [0] * len(entries)
    pos = 0
    for i in order:
        key, t = entries[i]
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
        offsets[i] = pos
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    direct = pos >= _DIRECT_MIN
    text += b" " * ((-(8 + len(text))) % (_PAGE if direct else 8))
    head = struct.pack("<Q", len(text)) + text
    return head, [len(head) + o for o in offsets], direct, len(head) + pos


def _group_file(key: Any, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", str(key)).lstrip(".") or "tensors"
    fname, n = f"{stem}.safetensors", 1
    while fname in taken:
        n += 1
        fname = f"{stem}-{n}.safetensors"
    return fname


class Snapshot:
    """A state split into a JSON tree and safetensors file images in host memory.

    Tensors for which ``deferred(tensor)`` held are copied by :meth:`complete` (the writer thread)
    rather than by :func:`snapshot_state`; the caller must not modify them in place until
    :meth:`guard` returns. CUDA tensors are copied with asynchronous device-to-host copies: the
    non-deferred ones on the current stream (so later kernels on it are ordered after the copy),
    the deferred ones on a side stream that :meth:`guard` makes the current stream wait for.
    """

    def __init__(self, tree_json: bytes, images: dict[str, FileImage], deferred: list[_Slot],
                 events: list[Any], side_events: list[Any], copy_s: float) -> None:
        self.tree_json = tree_json
        self.images = images
        self._deferred = deferred
        self._events = events
        self._side_events = side_events
        self._host_deferred = bool(deferred)
        self.copy_s = copy_s
        self.copied = threading.Event()
        if not deferred and not events and not side_events:
            self.copied.set()

    @property
    def has_deferred(self) -> bool:
        return self._host_deferred or bool(self._side_events)

    def complete(self) -> None:
        """Runs the deferred host copies and waits for the device-to-host copies; then the images
        hold the state and the live tensors are free to change. Always releases :meth:`guard`."""
        try:
            started = time.perf_counter()
            for slot in self._deferred:
                n = slot.source.numel()
                np.copyto(slot.image.buffer.array[slot.offset:slot.offset + n], slot.source.numpy())
            for event in (*self._events, *(event for _, event in self._side_events)):
                event.synchronize()
            self.copy_s += time.perf_counter() - started
        finally:
            self._deferred = []
            self.copied.set()

    def guard(self) -> None:
        """Returns once the live tensors may be modified: the host copies are done, and the
        current CUDA stream is ordered after the device-to-host copies (without a host wait)."""
        for device, event in self._side_events:
            torch.cuda.current_stream(device).wait_event(event)
        if self._host_deferred:
            self.copied.wait()

    def writers(self, times: IOTimes | None = None, compress: str = "none", level: int = 3,
                checksum: str = "sha256") -> dict[str, Callable[[Path], dict[str, Any]]]:
        """One writer per file: the images (compressed as ``<fname>.zst`` with ``compress="zstd"``)
        and ``state.json``, each recording its ``checksum``."""
        times = times or IOTimes()
        out: dict[str, Callable[[Path], dict[str, Any]]] = {}
        for fname, image in sorted(self.images.items(), key=lambda item: -item[1].size):
            if compress == "zstd":
                out[fname + ZSTD_SUFFIX] = lambda path, image=image: _write_zstd(path, image.view(), level, times,
                                                                                checksum)
            else:
                out[fname] = lambda path, image=image: _write_image(path, image, times, checksum)
        out[STATE_JSON] = bytes_writer(self.tree_json, times, checksum)
        return out


_side_streams: dict[int, Any] = {}


def _side_stream(device: torch.device) -> Any:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def snapshot_state(state: Mapping[str, Any], buffers: dict[str, HostBuffer], *,
                   deferred: Callable[[torch.Tensor], bool] | None = None,
                   file_of: Callable[[str], str] | None = None) -> Snapshot:
    """Lays ``state`` out as a :class:`Snapshot` and copies its tensors into host buffers.

    Each top-level key's tensors go to one ``<key>.safetensors`` file (or to ``file_of(key)``,
    where tensor keys then start with the top-level key); every other leaf (int, float, str, bool,
    None, list, tuple, dict with any keys) goes into the JSON tree, where a tensor is a
    ``{"__tensor__": [file, key]}`` reference.

    Args:
        state: nested mappings/lists whose leaves are tensors or JSON scalars.
        buffers: host buffers from the previous snapshot, keyed by file name. A buffer is reused
            when it is large enough, so repeated snapshots of the same state hold one host copy.
            Pass ``{}`` for a one-off. The previous snapshot must be written before this is called.
        deferred: tensors for which it is true are copied later, by :meth:`Snapshot.complete`.
        file_of: the file a top-level key's tensors go to.

    Raises:
        TypeError: a leaf that is neither a tensor of a storable dtype nor JSON-able, naming its path.
    """
    entries: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}  # fname -> (key, original, bytes)
    keys_in: dict[str, set[str]] = {}
    seen: set[str] = set()

    def tensor_ref(t: torch.Tensor, fname: str, path: str, where: str) -> dict[str, list[str]]:
        if t.dtype not in _ST_DTYPES or t.layout != torch.strided:
            raise TypeError(f"checkpoint state at {where!r}: cannot store a tensor of dtype {t.dtype} "
                            f"and layout {t.layout}")
        taken = keys_in.setdefault(fname, {_ST_RESERVED})
        key, n = path or "tensor", 1
        while key in taken:
            n += 1
            key = f"{path}#{n}"
        taken.add(key)
        entries.setdefault(fname, []).append((key, t, _as_bytes(t)))
        return {_TENSOR: [fname, key]}

    def encode(obj: Any, fname: str, path: str, where: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return tensor_ref(obj, fname, path, where)
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) and k not in _MARKERS for k in obj):
                return {k: encode(v, fname, f"{path}.{k}" if path else k, f"{where}.{k}") for k, v in obj.items()}
            return {_PAIRS: [[encode(k, fname, path, where),
                              encode(v, fname, f"{path}.{k}" if path else str(k), f"{where}.{k}")]
                             for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {_TUPLE: [encode(v, fname, f"{path}.{i}", f"{where}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [encode(v, fname, f"{path}.{i}", f"{where}.{i}") for i, v in enumerate(obj)]
        raise TypeError(f"checkpoint state at {where!r}: cannot store a {type(obj).__name__}")

    tree = {}
    for top, value in state.items():
        if not isinstance(top, str):
            raise TypeError(f"checkpoint state: top-level keys must be str, got {top!r}")
        if file_of is not None:
            tree[top] = encode(value, file_of(top), top, top)
        else:
            fname = _group_file(top, seen)
            seen.add(fname)
            tree[top] = encode(value, fname, "", top)
    tree_json = json.dumps(tree, sort_keys=True).encode()

    started = time.perf_counter()
    images: dict[str, FileImage] = {}
    later: list[_Slot] = []
    cuda_main: set[torch.device] = set()
    side_events: list[Any] = []
    for fname, items in entries.items():
        head, offsets, direct, size = _layout([(key, original) for key, original, _ in items])
        pinned = any(b.is_cuda for _, _, b in items)
        buf = buffers.get(fname)
        if buf is None or not buf.fits(_round_up(size, _PAGE), pinned):
            buffers.pop(fname, None)  # the old buffer goes before the new one is allocated
            buf = buffers[fname] = HostBuffer(size, pinned)
        image = images[fname] = FileImage(fname, size, buf, direct)
        buf.array[:len(head)] = np.frombuffer(head, dtype=np.uint8)
        for offset, (_, original, src) in zip(offsets, items):
            n = src.numel()
            if n == 0:
                continue
            dst = buf.tensor[offset:offset + n]
            if src.is_cuda:
                if deferred is not None and deferred(original):
                    stream = _side_stream(src.device)
                    stream.wait_stream(torch.cuda.current_stream(src.device))
                    with torch.cuda.stream(stream):
                        dst.copy_(src, non_blocking=True)
                    src.record_stream(stream)
                    event = torch.cuda.Event()
                    event.record(stream)
                    side_events.append((src.device, event))
                else:
                    dst.copy_(src, non_blocking=True)
                    cuda_main.add(src.device)
            elif deferred is not None and deferred(original):
                later.append(_Slot(src, image, offset))
            else:
                dst.copy_(src)
    events = []
    for device in cuda_main:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        events.append(event)
    return Snapshot(tree_json, images, later, events, side_events, time.perf_counter() - started)


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
        try:
            fname, key = payload
            return files[fname][key]
        except (KeyError, TypeError, ValueError):
            raise CheckpointCorrupt(f"{where / STATE_JSON}: refers to tensor {payload!r} that is not in the "
                                    "checkpoint") from None
    return {k: decode_state(v, files, where) for k, v in tree.items()}


# --- writing files ---------------------------------------------------------------------------------


@dataclass
class IOTimes:
    """Where a commit's time went, summed over threads (the activities overlap)."""

    checksum_s: float = 0.0
    write_s: float = 0.0
    fsync_s: float = 0.0
    compress_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, what: str, seconds: float) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + seconds)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size_and_digest(path: Path, algorithm: str = "sha256") -> tuple[int, str]:
    digest, size = new_digest(algorithm), 0
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


def bytes_writer(data: bytes, times: IOTimes | None = None,
                 checksum: str = "sha256") -> Callable[[Path], dict[str, Any]]:
    """A writer of ``data`` that returns its manifest entry."""
    def write(path: Path) -> dict[str, Any]:
        started = time.perf_counter()
        digest = new_digest(checksum, data).hexdigest()
        hashed = time.perf_counter()
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            written = time.perf_counter()
            os.fsync(f.fileno())
        if times is not None:
            times.add("checksum_s", hashed - started)
            times.add("write_s", written - hashed)
            times.add("fsync_s", time.perf_counter() - written)
        return {"size": len(data), checksum: digest}

    return write


def _open_new(path: Path, direct: bool) -> tuple[int, bool]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # the filesystem does not do O_DIRECT (e.g. tmpfs)
                raise
    return os.open(path, flags, 0o644), False


def _pwrite_all(fd: int, data: memoryview, direct: bool) -> None:
    """Writes ``data`` at offset 0. A filesystem that accepted O_DIRECT at open but refuses the
    write gets the rest through the page cache."""
    off = 0
    while off < len(data):
        try:
            off += os.pwrite(fd, data[off:off + _IO_CHUNK], off)
        except OSError as exc:
            if not (direct and exc.errno == errno.EINVAL):
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            direct = False


def _write_image(path: Path, image: FileImage, times: IOTimes, checksum: str = "sha256") -> dict[str, Any]:
    """Writes and hashes a file image in one pass over memory: the write (O_DIRECT where possible,
    whole pages, then truncated to size) runs in a second thread while this one hashes."""
    data = image.view()
    fd, direct = _open_new(path, image.direct)
    try:
        failure: list[BaseException] = []

        def write() -> None:
            started = time.perf_counter()
            try:
                padded = image.padded_view() if direct else data
                _pwrite_all(fd, padded, direct)
                if len(padded) != len(data):  # whole pages went out; the file ends where the data does
                    os.ftruncate(fd, len(data))
            except BaseException as exc:  # re-raised in the calling thread
                failure.append(exc)
            finally:
                times.add("write_s", time.perf_counter() - started)

        writer = None
        if len(data) >= _DIRECT_MIN:
            writer = threading.Thread(target=write, name="checkpoint-write", daemon=True)
            writer.start()
        started = time.perf_counter()
        digest = new_digest(checksum, data).hexdigest()
        times.add("checksum_s", time.perf_counter() - started)
        if writer is None:
            write()
        else:
            writer.join()
        if failure:
            raise failure[0]
        started = time.perf_counter()
        os.fsync(fd)
        times.add("fsync_s", time.perf_counter() - started)
    finally:
        os.close(fd)
    return {"size": len(data), checksum: digest}


def _write_zstd(path: Path, data: memoryview, level: int, times: IOTimes, checksum: str = "sha256") -> dict[str, Any]:
    """Compresses ``data`` while writing it, a chunk at a time (memory: the compressor's window and
    one output chunk); the digest is of the compressed bytes as stored."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj(size=len(data))
    digest, stored = new_digest(checksum), 0
    with open(path, "xb") as f:
        for off in range(0, len(data), _ZSTD_CHUNK):
            started = time.perf_counter()
            out = compressor.compress(data[off:off + _ZSTD_CHUNK])
            compressed = time.perf_counter()
            digest.update(out)
            hashed = time.perf_counter()
            f.write(out)
            times.add("compress_s", compressed - started)
            times.add("checksum_s", hashed - compressed)
            times.add("write_s", time.perf_counter() - hashed)
            stored += len(out)
        out = compressor.flush()
        digest.update(out)
        f.write(out)
        stored += len(out)
        f.flush()
        started = time.perf_counter()
        os.fsync(f.fileno())
        times.add("fsync_s", time.perf_counter() - started)
    return {"size": stored, checksum: digest.hexdigest(), "raw_size": len(data)}


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
                and len(sums) == 1 and isinstance(entry[sums[0]], str)
                and _CHECKSUM_HEX[sums[0]].fullmatch(entry[sums[0]])):
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
                      times: IOTimes | None = None) -> CommitResult:
    """Writes a checkpoint and commits it.

    Each ``writers[fname](path)`` writes one file into the temporary directory, fsyncs it and
    returns its manifest entry (size and checksum of the bytes it wrote); a writer that returns None
    has its file fsynced and hashed (SHA-256) here, read back. Up to ``workers`` files are written at once.
    Then the manifest is written and fsynced last, the directory is renamed to ``name`` and
    ``tier_root`` is fsynced.

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
    times = times or IOTimes()
    tmp = new_tmp_dir(tier_root, name)
    try:
        def write_one(fname: str) -> dict[str, Any]:
            entry = writers[fname](tmp / fname)
            if entry is None:
                started = time.perf_counter()
                _fsync_file(tmp / fname)
                times.add("fsync_s", time.perf_counter() - started)
                started = time.perf_counter()
                size, digest = _size_and_digest(tmp / fname)
                times.add("checksum_s", time.perf_counter() - started)
                entry = {"size": size, "sha256": digest}
            return entry

        names = list(writers)
        if workers > 1 and len(names) > 1:
            with ThreadPoolExecutor(max_workers=min(workers, len(names)), thread_name_prefix="checkpoint-file") as pool:
                entries = dict(zip(names, pool.map(write_one, names)))
        else:
            entries = {fname: write_one(fname) for fname in names}
        files = {fname: entries[fname] for fname in sorted(entries)}
        manifest = encode_manifest({"format": FORMAT_VERSION, "name": name, "created_ns": time.time_ns(),
                                    "files": files, "meta": dict(meta)})
        started = time.perf_counter()
        _write_durably(tmp / MANIFEST, manifest)
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
            if _size_and_digest(path, algorithm)[1] != expected:
                raise CheckpointCorrupt(f"{path}: {_CHECKSUM_LABEL[algorithm]} differs from the manifest (altered)")
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
        raise CheckpointCorrupt(f"{where}: {_CHECKSUM_LABEL[algorithm]} differs from the manifest (altered)")


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
    atomic_write(tier_root / pointer, lambda tmp: _write_durably(tmp, data))
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
