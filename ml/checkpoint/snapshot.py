"""A training state laid out for writing: a JSON tree plus safetensors file images in host memory.

Each safetensors file is laid out in a page-aligned host buffer exactly as it will be on disk
(header, then the tensor bytes), and the tensors are copied into it (CUDA tensors with asynchronous
device-to-host copies into page-locked memory, on a side stream for the tensors only
``optimizer.step()`` changes), so the writers (:mod:`ml.checkpoint.writers`) hash and write each
buffer in one pass. The buffers are reused from one save to the next: one host copy of the state.
The tree's encoding is undone by :func:`decode_state`; nothing is pickled.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.checkpoint.store import STATE_JSON, ZSTD_SUFFIX, CheckpointCorrupt
from ml.checkpoint.writers import DIRECT_MIN, IdleThreads, IOTimes, bytes_writer, write_image, write_zstd

__all__ = ["FileImage", "HostBuffer", "Snapshot", "decode_state", "modified_by_step", "snapshot_state"]

_PAGE = mmap.PAGESIZE
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
    direct = pos >= DIRECT_MIN
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
        self._ordered: set[Any] = set()  # the streams guard() has ordered after the side-stream copies
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
        current CUDA stream is ordered after the device-to-host copies (without a host wait).

        It runs before every ``optimizer.step()`` while the save is in flight: a stream once
        ordered stays ordered, so each stream waits on the event once, not once a step."""
        for device, event in self._side_events:
            stream = torch.cuda.current_stream(device)
            if stream not in self._ordered:
                stream.wait_event(event)
                self._ordered.add(stream)
        if self._host_deferred:
            self.copied.wait()

    def writers(self, times: IOTimes | None = None, compress: str = "none", level: int = 3,
                checksum: str = "sha256",
                idle: IdleThreads | None = None) -> dict[str, Callable[[Path], dict[str, Any]]]:
        """One writer per file: the images (compressed as ``<fname>.zst`` with ``compress="zstd"``)
        and ``state.json``, each recording its ``checksum``; with ``idle``, an image's write thread
        is one of its idle threads."""
        times = times or IOTimes()
        out: dict[str, Callable[[Path], dict[str, Any]]] = {}
        for fname, image in sorted(self.images.items(), key=lambda item: -item[1].size):
            if compress == "zstd":
                out[fname + ZSTD_SUFFIX] = lambda path, image=image: write_zstd(path, image.view(), level, times,
                                                                                checksum)
            else:
                out[fname] = lambda path, image=image: write_image(path, image, times, checksum, idle)
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
    cuda_side: set[torch.device] = set()
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
                    cuda_side.add(src.device)
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
    # one event per device after its last side-stream copy: the stream runs its copies in order
    side_events = []
    for device in cuda_side:
        event = torch.cuda.Event()
        event.record(_side_stream(device))
        side_events.append((device, event))
    return Snapshot(tree_json, images, later, events, side_events, time.perf_counter() - started)


def modified_by_step(optimizer: torch.optim.Optimizer | None) -> Callable[[torch.Tensor], bool] | None:
    """A ``deferred`` predicate for :func:`snapshot_state`: whether a tensor shares storage with the
    optimizer's parameters or state, which change only in ``optimizer.step()``."""
    if optimizer is None:
        return None
    storages = {p.untyped_storage().data_ptr() for group in optimizer.param_groups for p in group["params"]}
    storages |= {v.untyped_storage().data_ptr() for per_param in optimizer.state.values()
                 for v in per_param.values() if isinstance(v, torch.Tensor)}
    storages.discard(0)
    return lambda t: t.untyped_storage().data_ptr() in storages


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
