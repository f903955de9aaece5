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

With ``third_party_to_log=True`` the terminal is kept for people: records of other libraries'
loggers below ERROR (Great Expectations' one line per check, MLflow's and DVC's notices) and
warnings raised from other libraries' code (MLflow's schema hints, dataset-source notices) go to the
log only. The project's own loggers (``ml``, ``tasks``, ``flows``, ...; Prefect's flow- and task-run
loggers, which carry the stages' lines) and warnings raised from the project's code still reach both.
This works through logging filters on the console handlers (those present when the block starts,
``logging.lastResort``, and those a library adds inside the block, found by the log record factory)
and through ``warnings.showwarning``: the switches the two modules offer.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
import warnings
from pathlib import Path
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

STREAMS = {"stdout": 1, "stderr": 2}
_CHUNK = 1 << 16
# The project's packages: their loggers and the warnings raised from their files are its own.
OWN_PACKAGES = ("ml", "tasks", "flows", "registry", "lineage", "deploy", "mlops", "benchmarks")
# Prefect's run loggers carry the stages' own lines: a task run's state, a stage's prints.
OWN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
_ROOT = Path(__file__).resolve().parents[2]


def is_own_logger(name: str) -> bool:
    """Whether the logger ``name`` is the project's (or one of Prefect's run loggers)."""
    return any(name == own or name.startswith(f"{own}.") for own in (*OWN_PACKAGES, *OWN_LOGGERS))


def is_own_source(filename: str) -> bool:
    """Whether ``filename`` (where a warning was raised) is a file of the project's packages."""
    try:
        parts = Path(filename).resolve().relative_to(_ROOT).parts
    except (ValueError, OSError):
        return False
    return bool(parts) and parts[0] in OWN_PACKAGES


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
                    self.log(data)
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

    def log(self, data: bytes) -> None:
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


_ROUTERS: list[_ThirdPartyRouter] = []  # the captures routing now, innermost last


class _LogOnly(logging.Filter):
    """On one console handler: a third-party record below ERROR is formatted by that handler and
    written to the log instead of the terminal."""

    def __init__(self, router: _ThirdPartyRouter, handler: logging.Handler) -> None:
        super().__init__()
        self.router, self.handler = router, handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or is_own_logger(record.name) or _ROUTERS[-1:] != [self.router]:
            return True  # the terminal's, or the innermost capture's to route
        if record is not self.router.last:  # a record two console handlers print is logged once
            self.router.last = record
            try:
                self.router.to_log(self.handler.format(record) + "\n")
            except Exception:  # noqa: BLE001 - a record that cannot be formatted is dropped, as logging does
                pass
        return False


class _ThirdPartyRouter:
    """Sends other libraries' console output to the log only, for one capture (module docstring)."""

    def __init__(self, to_log: Callable[[str], None]) -> None:
        self.to_log = to_log
        self.last: logging.LogRecord | None = None
        self.active = False
        self._filters: dict[int, _LogOnly] = {}  # id(handler) -> its filter
        self._showwarning: Any = None
        self._record_factory: Callable[..., logging.LogRecord] | None = None
        self._lock = threading.Lock()

    def install(self) -> None:
        self.active = True
        _ROUTERS.append(self)
        loggers = [logging.getLogger(), *(logger for logger in list(logging.root.manager.loggerDict.values())
                                          if isinstance(logger, logging.Logger))]
        self._cover([h for logger in loggers for h in logger.handlers] + [logging.lastResort])
        # A library imported inside the block may add console handlers of its own (DVC does, on
        # import): each new record first covers the handlers on its logger's way to the root.
        self._record_factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(self._make_record)
        self._showwarning = warnings.showwarning
        warnings.showwarning = self.showwarning

    def _cover(self, handlers: list[logging.Handler | None]) -> None:
        with self._lock:
            for handler in handlers:
                if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
                        and id(handler) not in self._filters):
                    log_only = _LogOnly(self, handler)
                    handler.addFilter(log_only)
                    self._filters[id(handler)] = log_only

    def _make_record(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = (self._record_factory or logging.LogRecord)(*args, **kwargs)
        if self.active and not is_own_logger(record.name):
            logger: logging.Logger | None = logging.getLogger(record.name)
            handlers: list[logging.Handler | None] = []
            while logger is not None:
                handlers.extend(logger.handlers)
                logger = logger.parent if logger.propagate else None
            self._cover(handlers)
        return record

    def showwarning(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
        if file is not None:  # an explicit destination is the caller's choice
            self._showwarning(message, category, filename, lineno, file, line)
            return
        text = warnings.formatwarning(message, category, filename, lineno, line)
        if is_own_source(filename):
            sys.stderr.write(text)  # the terminal and the log
        else:
            self.to_log(text)

    def uninstall(self) -> None:
        self.active = False
        if self in _ROUTERS:
            _ROUTERS.remove(self)
        if self._showwarning is not None and warnings.showwarning == self.showwarning:
            warnings.showwarning = self._showwarning
        self._showwarning = None
        if logging.getLogRecordFactory() == self._make_record and self._record_factory is not None:
            logging.setLogRecordFactory(self._record_factory)  # else a later factory wraps ours: it stays inert
        with self._lock:
            for log_only in self._filters.values():
                log_only.handler.removeFilter(log_only)
            self._filters.clear()
        self.last = None


class ConsoleCapture:
    """The context manager :func:`capture_console` returns; see the module docstring.

    Attributes:
        path: The log file.
    """

    def __init__(self, path: str | Path, *, append: bool = False, drain_timeout_s: float = 2.0,
                 third_party_to_log: bool = False) -> None:
        if drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s: expected a number >= 0, got {drain_timeout_s!r}")
        self.path = Path(path)
        self.append = append
        self.drain_timeout_s = drain_timeout_s
        self._saved: dict[int, int] = {}
        self._originals: dict[str, TextIO] = {}
        self._tee: _Tee | None = None
        self._router = _ThirdPartyRouter(self.to_log) if third_party_to_log else None

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
        if self._router is not None:
            self._router.install()
        return self

    def to_log(self, text: str) -> None:
        """Writes ``text`` into the log only (not the terminal); nothing once the block has ended."""
        tee = self._tee
        if tee is not None:
            _flush_stdio()  # what was printed before it comes before it in the log
            tee.log(text.encode("utf-8", "replace"))

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
        if self._router is not None:
            self._router.uninstall()
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


def capture_console(path: str | Path, *, append: bool = False, drain_timeout_s: float = 2.0,
                    third_party_to_log: bool = False) -> ConsoleCapture:
    """Tees stdout and stderr (descriptors 1 and 2) into the file ``path`` for a ``with`` block.

    Args:
        path: The log file; its directory is created. Truncated unless ``append``.
        append: Add to an existing log instead of replacing it.
        drain_timeout_s: How long the exit waits for child processes that still hold the console
            (e.g. a server started inside the block) before closing the log without their output.
        third_party_to_log: Send other libraries' log records below ERROR and warnings raised from
            their code to the log only (module docstring); the terminal keeps the project's own.

    Returns:
        A :class:`ConsoleCapture`; ``with capture_console(p) as capture:`` gives it, and
        ``capture.original("stderr")`` writes to the terminal without entering the log.
    """
    return ConsoleCapture(path, append=append, drain_timeout_s=drain_timeout_s, third_party_to_log=third_party_to_log)
