"""A non-blocking metric path: the training thread appends, a background thread ships.

``MetricBuffer.log`` only appends a tuple to a deque, so a training step never waits on the
tracking server. A daemon thread drains the deque in chunks of at most ``max_batch`` and hands
them to ``send_batch`` (normally ``client.log_batch``). When the store cannot be reached, chunks go
to an append-only, fsync'd JSON-lines spool file, and every later chunk follows them there until a
retry has replayed the whole spool, so the store receives each key's points in logged order. The
spool outlives the process: a new buffer on the same spool path replays the leftovers first.

Delivery is exactly once while the process lives. Across a crash it is at least once for the one
spool chunk whose send had succeeded but whose progress mark had not yet been written; MLflow's
SQL store ignores an exact duplicate (same key, value, timestamp and step), so that resend is
harmless there.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

_logger = logging.getLogger(__name__)

MLFLOW_MAX_METRICS_PER_BATCH = 1000


class MetricRecord(NamedTuple):
    """One metric point, field order matching ``mlflow.entities.Metric(key, value, timestamp, step)``."""

    key: str
    value: float
    timestamp_ms: int
    step: int


SendBatch = Callable[[Sequence[MetricRecord]], None]


@dataclass(frozen=True)
class BufferCounters:
    """What a buffer has done with the metrics it was given, cumulative over its life.

    Attributes:
        sent: Points that ``send_batch`` accepted on the first try.
        spooled: Points written to the spool file (an outage, or queued behind an earlier one).
        replayed: Points sent from the spool, leftovers of an earlier process included.
        spool_backlog: Points still in the spool file, waiting for the store to come back.
        unflushed: Points still in memory because a timeout ran out; lost if the process ends.
        dropped: Points that could neither be sent nor written to the spool (disk error).
    """

    sent: int = 0
    spooled: int = 0
    replayed: int = 0
    spool_backlog: int = 0
    unflushed: int = 0
    dropped: int = 0


class MetricBuffer:
    """Buffers metric points in memory and ships them from a daemon thread.

    Args:
        send_batch: Delivers one chunk (at most ``max_batch`` points) to the store; raising any
            ``Exception`` means "not delivered" and sends the chunk to the spool. Called only from
            the buffer's thread, or from the thread calling :meth:`flush` / :meth:`close`.
        spool_path: The spool file. A sidecar ``<spool_path>.offset`` records how much of it has
            been replayed. One live buffer per spool path.
        flush_interval: Seconds between drains.
        max_batch: Largest chunk handed to ``send_batch`` (MLflow accepts 1000 metrics per call).
        retry_interval: Seconds between replay attempts while the spool is non-empty.
        register_atexit: Close the buffer when the interpreter exits.
    """

    def __init__(self, send_batch: SendBatch, spool_path: str | Path, flush_interval: float = 1.0,
                 max_batch: int = MLFLOW_MAX_METRICS_PER_BATCH, retry_interval: float = 5.0,
                 register_atexit: bool = True) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._send_batch = send_batch
        self._spool = _Spool(Path(spool_path))
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._retry_interval = retry_interval
        self._pending: deque[tuple[str, Any, int, int]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # Serialises every send and spool write, so chunks leave in the order they were logged.
        self._io_lock = threading.Lock()
        self._next_retry = 0.0
        self._sent = self._spooled = self._replayed = self._dropped = 0
        self._closed = False
        self.log = self._fast_log()  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._run, name="MetricBuffer", daemon=True)
        self._thread.start()
        if register_atexit:
            atexit.register(_close_at_exit, weakref.ref(self))

    def log(self, key: str, value: float, step: int, timestamp_ms: int | None = None) -> None:
        """Queues one point and returns at once; never raises on a store error.

        The training thread only appends ``(key, value, time_ns, step)``; the conversion to a float
        and to milliseconds happens on the buffer's thread (so a 0-d tensor is read there too).
        Each instance replaces this method with the closure from :meth:`_fast_log`, which does the
        same with every name bound locally (the hot path of a training step).
        """
        self._fast_log()(key, value, step, timestamp_ms)

    def _fast_log(self) -> Callable[..., None]:
        append, pending, max_batch, wake, time_ns = (self._pending.append, self._pending, self._max_batch,
                                                     self._wake, time.time_ns)

        def log(key: str, value: float, step: int, timestamp_ms: int | None = None) -> None:
            append((key, value, time_ns() if timestamp_ms is None else timestamp_ms * 1_000_000, step))
            if len(pending) >= max_batch and not wake.is_set():
                wake.set()

        return log

    def flush(self, timeout: float | None = None) -> BufferCounters:
        """Sends (or spools) every point logged before the call, in the calling thread.

        Retries the spool once first, so a flush after the store came back empties it. Waits at
        most ``timeout`` seconds for a drain already running in the buffer's thread.
        """
        return self._flush(timeout, force_retry=True)

    def close(self, timeout: float | None = None) -> BufferCounters:
        """Drains everything, stops the thread and returns the counters. Safe to call again.

        A later call (the atexit hook, a signal) also drains points logged after the first one.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        # The thread's last drain already retried the spool; retrying again would only wait on a
        # store that just failed. A thread that did not finish leaves the retry to this drain.
        return self._flush(None if deadline is None else max(deadline - time.monotonic(), 0.0),
                           force_retry=self._thread.is_alive())

    def _flush(self, timeout: float | None, force_retry: bool) -> BufferCounters:
        if not self._io_lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            return self.counters()
        try:
            self._drain(force_retry=force_retry)
        finally:
            self._io_lock.release()
        return self.counters()

    @property
    def closed(self) -> bool:
        return self._closed

    def counters(self) -> BufferCounters:
        return BufferCounters(sent=self._sent, spooled=self._spooled, replayed=self._replayed,
                              spool_backlog=self._spool.backlog(), unflushed=len(self._pending),
                              dropped=self._dropped)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._flush_interval)
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                with self._io_lock:
                    self._drain(force_retry=stopping)
            except Exception:
                # The thread must outlive any surprise: the chunk in hand is lost (and reported
                # here), the points still queued go out on the next drain.
                _logger.exception("metric buffer drain failed")
            if stopping:
                return

    def _drain(self, force_retry: bool) -> None:
        """Ships everything queued. Caller holds ``_io_lock``."""
        if self._spool.backlog() and (force_retry or time.monotonic() >= self._next_retry):
            self._replay()
        pending, max_batch = self._pending, self._max_batch
        while pending:
            chunk = []
            while pending and len(chunk) < max_batch:
                key, value, time_ns, step = pending.popleft()
                try:
                    chunk.append(MetricRecord(key, float(value), time_ns // 1_000_000, step))
                except (TypeError, ValueError, RuntimeError):
                    self._dropped += 1
                    _logger.error("metric %r at step %s is not a number (%r); dropped", key, step, value)
            if self._spool.backlog():
                self._write_spool(chunk)
                continue
            try:
                self._send_batch(chunk)
            except Exception as exc:
                _logger.warning("tracking store unreachable, spooling %d metrics to %s: %s",
                                len(chunk), self._spool.path, exc)
                self._next_retry = time.monotonic() + self._retry_interval
                self._write_spool(chunk)
            else:
                self._sent += len(chunk)

    def _replay(self) -> None:
        """Sends the spool in order; empties it only once all of it has gone through."""
        try:
            for chunk, end_offset in self._spool.read_chunks(self._max_batch):
                self._send_batch(chunk)
                self._replayed += len(chunk)
                self._spool.mark_sent(end_offset)
        except Exception as exc:
            self._next_retry = time.monotonic() + self._retry_interval
            _logger.info("spool replay deferred, %d metrics wait in %s: %s", self._spool.backlog(),
                         self._spool.path, exc)
            return
        self._spool.clear()
        _logger.info("spool %s replayed", self._spool.path)

    def _write_spool(self, chunk: list[MetricRecord]) -> None:
        try:
            self._spool.append(chunk)
        except OSError:
            self._dropped += len(chunk)
            _logger.exception("could not spool %d metrics to %s; they are lost", len(chunk), self._spool.path)
        else:
            self._spooled += len(chunk)


class _Spool:
    """The append-only JSON-lines file, one ``[key, value, timestamp_ms, step]`` per line.

    ``<path>.offset`` holds the byte offset up to which lines were replayed, so a replay that
    fails half-way does not send its first chunks twice.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset_path = path.with_name(path.name + ".offset")
        self._drop_torn_tail()
        self._offset = self._read_offset()
        self._lines = self._count_lines_after(self._offset)

    def backlog(self) -> int:
        return self._lines

    def append(self, chunk: Sequence[MetricRecord]) -> None:
        payload = "".join(json.dumps(list(record)) + "\n" for record in chunk).encode()
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)
        self._lines += len(chunk)

    def read_chunks(self, size: int):
        """Yields ``(records, end_offset)`` from the unreplayed part of the file."""
        chunk: list[MetricRecord] = []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            position = self._offset
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                position += len(raw)
                try:
                    key, value, timestamp_ms, step = json.loads(raw)
                    chunk.append(MetricRecord(key, float(value), int(timestamp_ms), int(step)))
                except (ValueError, TypeError):
                    # One unreadable line must not hold back everything behind it forever.
                    _logger.error("skipping an unreadable spool line in %s: %r", self.path, raw[:200])
                    continue
                if len(chunk) == size:
                    yield chunk, position
                    chunk = []
            if chunk:
                yield chunk, position

    def mark_sent(self, end_offset: int) -> None:
        sent_lines = self._count_lines_between(self._offset, end_offset)
        tmp = self._offset_path.with_name(self._offset_path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(end_offset))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._offset_path)
        self._offset = end_offset
        self._lines = max(self._lines - sent_lines, 0)

    def clear(self) -> None:
        # Truncate before dropping the offset: a crash in between leaves an offset past the end,
        # which _read_offset treats as "nothing left", never as "replay from the start".
        if self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(0)
                os.fsync(f.fileno())
        self._offset_path.unlink(missing_ok=True)
        self._offset = 0
        self._lines = 0

    def _drop_torn_tail(self) -> None:
        """Cuts a last line left without its newline by a crash mid-write (never acknowledged)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "r+b") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            _logger.warning("dropping a torn last line in %s", self.path)
            f.truncate(data.rfind(b"\n") + 1)
            os.fsync(f.fileno())

    def _read_offset(self) -> int:
        try:
            offset = int(self._offset_path.read_text().strip() or 0)
        except (OSError, ValueError):
            # No offset file (nothing replayed yet), or an unusable spool path that the first
            # spool write will report.
            return 0
        size = self.path.stat().st_size if self.path.exists() else 0
        return offset if offset <= size else size

    def _count_lines_after(self, offset: int) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            f.seek(offset)
            return sum(1 for raw in f if raw.endswith(b"\n"))

    def _count_lines_between(self, start: int, end: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start).count(b"\n")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _close_at_exit(ref: weakref.ReferenceType[MetricBuffer]) -> None:
    buffer = ref()
    if buffer is not None:
        buffer.close(timeout=30.0)


def install_signal_flush(buffer: MetricBuffer, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
                         timeout: float = 10.0) -> bool:
    """Closes ``buffer`` on SIGTERM/SIGINT, then hands the signal to the handler that was there.

    Only the main thread may install signal handlers; elsewhere this does nothing. The previous
    handler runs afterwards, so SIGINT still raises ``KeyboardInterrupt`` and SIGTERM still ends
    the process by default. Points logged after the signal are drained by a later ``close()``.

    Returns:
        Whether the handlers were installed.
    """
    if threading.current_thread() is not threading.main_thread():
        _logger.debug("not in the main thread, metric buffer signal flush not installed")
        return False
    for signum in signals:
        previous = signal.getsignal(signum)
        signal.signal(signum, _chained_handler(buffer, signum, previous, timeout))
    return True


def _chained_handler(buffer: MetricBuffer, signum: int, previous: Any, timeout: float):
    def handle(received: int, frame: FrameType | None) -> None:
        buffer.close(timeout=timeout)
        if callable(previous):
            previous(received, frame)
        elif previous == signal.SIG_DFL:
            # Re-deliver with the default action (terminate), now that the metrics are safe.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return handle


def mlflow_batch_sender(client: Any, run_id: str) -> SendBatch:
    """A ``send_batch`` that logs a chunk to one MLflow run; entities are built here, off the hot path."""

    def send(records: Sequence[MetricRecord]) -> None:
        from mlflow.entities import Metric

        client.log_batch(run_id, metrics=[Metric(r.key, r.value, r.timestamp_ms, r.step) for r in records])

    return send
