"""Writing a checkpoint's files: each one written, checksummed and fsynced by a writer that returns
its manifest entry (size and checksum of the bytes as stored).

A file image (see :mod:`ml.checkpoint.snapshot`) is hashed and written in one pass over memory: the
hash runs in one thread while the write runs in another, with ``O_DIRECT`` for large files where
the filesystem allows it, so the data is copied once. ``.safetensors.zst`` files are compressed
while written, a chunk at a time.

Writer threads can run at idle scheduling priority (:class:`IdleThreads`): on a machine whose cores
the training keeps busy, the writer then only gets the CPU time training leaves, which keeps the
training loop's stall down and makes the commit later. Once someone waits for the commit, the
threads go back to normal priority: nobody then gains from their yielding.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.checkpoint.checksums import new_digest

if TYPE_CHECKING:
    from ml.checkpoint.snapshot import FileImage

__all__ = ["IOTimes", "IdleThreads", "bytes_writer", "write_durably", "write_image", "write_zstd",
           "yield_cpu"]

logger = logging.getLogger(__name__)

DIRECT_MIN = 4 << 20  # files at least this large start their data on a page boundary and bypass the page cache
_IO_CHUNK = 64 << 20  # bytes per write call
_ZSTD_CHUNK = 4 << 20  # bytes handed to the compressor at a time
_warned_priority = False


def yield_cpu() -> None:
    """Puts the calling thread at idle scheduling priority (Linux ``SCHED_IDLE``): it then runs
    only on CPU time no other thread wants. On Linux a thread's scheduling policy is its own, so
    this touches no other thread. Elsewhere, and where the system refuses, the thread keeps its
    priority (logged once)."""
    global _warned_priority
    try:
        if not hasattr(os, "SCHED_IDLE"):
            raise OSError("no SCHED_IDLE on this platform")
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        if not _warned_priority:
            _warned_priority = True
            logger.warning("checkpoint writer threads keep normal priority: %s", exc)


class IdleThreads:
    """The writer threads of one commit, at idle priority until :meth:`restore` is called.

    Each writer thread calls :meth:`enter` first; :meth:`restore` (called when the training thread
    starts waiting for the commit) puts every one of them back to normal priority, and a thread
    that enters afterwards stays normal. Restoring needs no privilege on Linux as long as the
    thread's nice value is allowed by ``RLIMIT_NICE``; where it is not, the threads stay idle
    (logged once).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tids: set[int] = set()
        self._restored = False

    def enter(self) -> None:
        with self._lock:
            if self._restored:
                return
            self._tids.add(threading.get_native_id())
            yield_cpu()

    def restore(self) -> None:
        global _warned_priority
        with self._lock:
            if self._restored:
                return
            self._restored = True
            for tid in self._tids:
                try:
                    os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                except ProcessLookupError:  # that thread is done
                    continue
                except OSError as exc:
                    if not _warned_priority:
                        _warned_priority = True
                        logger.warning("checkpoint writer threads stay at idle priority: %s", exc)


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


def write_durably(path: Path, data: bytes) -> None:
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


def write_image(path: Path, image: FileImage, times: IOTimes, checksum: str = "sha256",
                idle: IdleThreads | None = None) -> dict[str, Any]:
    """Writes and hashes a file image in one pass over memory: the write (O_DIRECT where possible,
    whole pages, then truncated to size) runs in a second thread while this one hashes. With
    ``idle``, that thread is one of its idle threads."""
    data = image.view()
    caller = threading.current_thread()
    fd, direct = _open_new(path, image.direct)
    try:
        failure: list[BaseException] = []

        def write() -> None:
            if idle is not None and threading.current_thread() is not caller:
                idle.enter()
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
        if len(data) >= DIRECT_MIN:
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


def write_zstd(path: Path, data: memoryview, level: int, times: IOTimes, checksum: str = "sha256") -> dict[str, Any]:
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
