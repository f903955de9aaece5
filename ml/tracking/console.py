"""Tee the process's console into a log file: ``with capture_console("logs/train.log"): ...``.

The capture works on file descriptors 1 and 2, so it sees everything that reaches the console:
``print``, logging handlers that hold ``sys.stderr`` from before the capture, ``warnings``, raw
``os.write(2, ...)``, C extensions, and child processes (they inherit the descriptors). Each
descriptor is pointed at a pipe; a reader thread copies what arrives both to the original
descriptor (the terminal still shows it, as it comes) and to the log file.

On exit, Python's and C's stdio buffers are flushed, descriptors 1 and 2 are put back exactly as
they were, and the pipes are drained into the log before it is closed. When the block raises, the
traceback is written to the log too (the interpreter prints it to the terminal only later, once the
exception has left the program), and the exception propagates unchanged. Output of a child process
that outlives the block still reaches the terminal, but no longer the log.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from pathlib import Path
from types import TracebackType
from typing import TextIO

STREAMS = {"stdout": 1, "stderr": 2}
_CHUNK = 1 << 16


def _flush_stdio() -> None:
    """Pushes buffered output of Python's and C's stdio into the descriptors."""
    for stream in {id(s): s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}.values():
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed or broken stream has nothing left to flush
            pass
    try:
        import ctypes

        # fflush(NULL) flushes every C stdio stream, e.g. printf output of an extension module.
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _Tee:
    """The reader thread: copies each pipe to its terminal descriptor and to the log."""

    def __init__(self, log_fd: int) -> None:
        self.log_fd = log_fd
        self.log_lock = threading.Lock()
        self.log_open = True
        self.log_error: OSError | None = None
        self.pairs: dict[int, int] = {}  # pipe read end -> a dup of the original descriptor
        self.thread = threading.Thread(target=self._run, name="capture_console", daemon=True)

    def add(self, read_fd: int, terminal_fd: int) -> None:
        self.pairs[read_fd] = terminal_fd

    def _run(self) -> None:
        import selectors

        selector = selectors.DefaultSelector()
        for read_fd in self.pairs:
            selector.register(read_fd, selectors.EVENT_READ)
        broken: set[int] = set()
        try:
            while selector.get_map():
                for key, _ in selector.select():
                    read_fd = key.fd
                    data = os.read(read_fd, _CHUNK)
                    if not data:  # every write end is closed: this stream is finished
                        selector.unregister(read_fd)
                        continue
                    # The log first: a slow terminal must not leave the log behind.
                    self._log(data)
                    terminal_fd = self.pairs[read_fd]
                    if terminal_fd not in broken:
                        try:
                            _write_all(terminal_fd, data)
                        except OSError:  # the terminal went away; keep the log going
                            broken.add(terminal_fd)
        finally:
            selector.close()
            for read_fd, terminal_fd in self.pairs.items():
                os.close(read_fd)
                os.close(terminal_fd)

    def _log(self, data: bytes) -> None:
        with self.log_lock:
            if not self.log_open or self.log_error is not None:
                return
            try:
                _write_all(self.log_fd, data)
            except OSError as exc:
                self.log_error = exc

    def close_log(self, trailer: bytes = b"") -> None:
        """Writes ``trailer`` and closes the log; later output goes to the terminal only."""
        with self.log_lock:
            if trailer and self.log_error is None:
                try:
                    _write_all(self.log_fd, trailer)
                except OSError as exc:
                    self.log_error = exc
            self.log_open = False
            os.close(self.log_fd)


def _exit_text(exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> str:
    """What the interpreter will print for an exception leaving the program: the traceback, or for
    ``SystemExit`` its message when it is a string (an exit code prints nothing)."""
    if exc is None:
        return ""
    if isinstance(exc, SystemExit):
        return f"{exc.code}\n" if isinstance(exc.code, str) else ""
    return "".join(traceback.format_exception(exc_type, exc, tb))


class ConsoleCapture:
    """The context manager :func:`capture_console` returns; see the module docstring.

    Attributes:
        path: The log file.
    """

    def __init__(self, path: str | Path, *, append: bool = False, drain_timeout_s: float = 2.0) -> None:
        if drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s: expected a number >= 0, got {drain_timeout_s!r}")
        self.path = Path(path)
        self.append = append
        self.drain_timeout_s = drain_timeout_s
        self._saved: dict[int, int] = {}
        self._originals: dict[str, TextIO] = {}
        self._tee: _Tee | None = None

    def __enter__(self) -> ConsoleCapture:
        if self._tee is not None:
            raise RuntimeError("capture_console: this capture is already active")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Always O_APPEND: every write lands at the current end, also when a nested capture or another
        # process writes the same file.
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if self.append else os.O_TRUNC)
        log_fd = os.open(self.path, flags, 0o644)
        tee = _Tee(log_fd)
        _flush_stdio()
        try:
            for fd in STREAMS.values():
                try:
                    saved = os.dup(fd)
                except OSError:  # the descriptor is closed (a daemon): nothing to capture there
                    continue
                self._saved[fd] = saved
                read_fd, write_fd = os.pipe()
                try:
                    terminal_fd = os.dup(saved)
                except OSError:
                    os.close(read_fd)
                    os.close(write_fd)
                    raise
                tee.add(read_fd, terminal_fd)
                try:
                    os.dup2(write_fd, fd)  # inheritable, so child processes write into the pipe too
                finally:
                    os.close(write_fd)
        except BaseException:
            self._restore_fds()
            for read_fd, terminal_fd in tee.pairs.items():
                os.close(read_fd)
                os.close(terminal_fd)
            os.close(log_fd)
            raise
        tee.thread.start()
        self._tee = tee
        return self

    def original(self, stream: str = "stderr") -> TextIO:
        """A text stream on the descriptor ``stream`` had before the capture: what is written to it
        shows on the terminal and stays out of the log (for a progress bar). Line-buffered; valid
        until the block ends."""
        if stream not in STREAMS:
            raise ValueError(f"stream: expected one of {', '.join(STREAMS)}, got {stream!r}")
        if self._tee is None:
            raise RuntimeError("capture_console: original() is available inside the block only")
        if stream not in self._originals:
            fd = STREAMS[stream]
            if fd not in self._saved:
                raise RuntimeError(f"capture_console: {stream} was closed when the capture began")
            encoding = getattr(sys.stdout if stream == "stdout" else sys.stderr, "encoding", None) or "utf-8"
            self._originals[stream] = os.fdopen(os.dup(self._saved[fd]), "w", buffering=1, encoding=encoding,
                                                errors="replace")
        return self._originals[stream]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        tee = self._tee
        if tee is None:
            return
        self._tee = None
        _flush_stdio()
        for stream in self._originals.values():
            try:
                stream.close()
            except OSError:
                pass
        self._originals.clear()
        self._restore_fds()
        # With fds 1 and 2 back, the pipes end once no child process holds their write ends.
        tee.thread.join(self.drain_timeout_s)
        tee.close_log(_exit_text(exc_type, exc, tb).encode("utf-8", "replace"))
        if tee.log_error is not None:
            print(f"capture_console: {self.path} is incomplete: {tee.log_error}", file=sys.stderr)

    def _restore_fds(self) -> None:
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved.clear()


def capture_console(path: str | Path, *, append: bool = False, drain_timeout_s: float = 2.0) -> ConsoleCapture:
    """Tees stdout and stderr (descriptors 1 and 2) into the file ``path`` for a ``with`` block.

    Args:
        path: The log file; its directory is created. Truncated unless ``append``.
        append: Add to an existing log instead of replacing it.
        drain_timeout_s: How long the exit waits for child processes that still hold the console
            (e.g. a server started inside the block) before closing the log without their output.

    Returns:
        A :class:`ConsoleCapture`; ``with capture_console(p) as capture:`` gives it, and
        ``capture.original("stderr")`` writes to the terminal without entering the log.
    """
    return ConsoleCapture(path, append=append, drain_timeout_s=drain_timeout_s)
