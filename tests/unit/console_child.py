"""Runs one capture_console scenario in its own process (fd-level capture cannot run under
pytest's own capturing). Usage: python console_child.py SCENARIO LOG [LOG2]. Ends by printing one
JSON line of observations, after the capture, on stdout."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import warnings

from ml.tracking.console import capture_console

CHILD = "import sys; print('child-stdout'); print('child-stderr', file=sys.stderr)"


def fd_identity() -> list[tuple[int, int, int, int]]:
    return [(os.fstat(fd).st_dev, os.fstat(fd).st_ino, os.fstat(fd).st_mode, fcntl.fcntl(fd, fcntl.F_GETFL))
            for fd in (1, 2)]


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def report(**observations: object) -> None:
    sys.stdout.flush()
    print(json.dumps(observations), flush=True)


def streams(log: str) -> None:
    logger = logging.getLogger("child")
    logger.addHandler(logging.StreamHandler(sys.stderr))  # holds the stream from before the capture
    logger.propagate = False
    before, fds_before = fd_identity(), open_fds()
    with capture_console(log):
        print("print-to-stdout")
        logger.warning("logging-to-stderr")
        os.write(2, b"raw-fd-2\n")
        os.write(1, b"raw-fd-1\n")
        warnings.warn("warning-text")
        subprocess.run([sys.executable, "-c", CHILD], check=True)
        print("unicode-\u00e9\u4e2d")
    print("after-block")
    logger.warning("after-block-log")
    report(fds_restored=fd_identity() == before, no_fd_leak=open_fds() == fds_before)


def exception(log: str) -> None:
    with capture_console(log):
        print("before-error")
        raise ValueError("boom-message")


def caught(log: str) -> None:
    before, fds_before = fd_identity(), open_fds()
    try:
        with capture_console(log):
            print("before-error")
            raise KeyError("caught-key")
    except KeyError as exc:
        report(caught=repr(exc), fds_restored=fd_identity() == before, no_fd_leak=open_fds() == fds_before)


def system_exit(log: str) -> None:
    with capture_console(log):
        raise SystemExit("fatal: stage failed")


def large(log: str) -> None:
    line = "x" * 99 + "\n"
    with capture_console(log):
        for _ in range(40_000):  # 4 MB each way, far beyond a pipe's buffer
            sys.stdout.write(line)
            sys.stderr.write(line)
        subprocess.run([sys.executable, "-c", "import sys; sys.stdout.write('y' * 2_000_000)"], check=True)
    report(done=True)


def nested(outer: str, inner: str) -> None:
    before = fd_identity()
    with capture_console(outer):
        print("outer-first")
        with capture_console(inner):
            print("inner-only")
            os.write(2, b"inner-fd-2\n")
        print("outer-last")
    report(fds_restored=fd_identity() == before)


def original(log: str) -> None:
    with capture_console(log) as capture:
        capture.original("stdout").write("terminal-only\n")
        print("both-places")
        inside = {"captured_isatty": sys.stdout.isatty(), "original_isatty": capture.original("stdout").isatty()}
    report(isatty_after=os.isatty(1), **inside)


def lingering(log: str) -> None:
    # A child that keeps the console open after the block: it writes once its stdin closes.
    with capture_console(log, drain_timeout_s=0.2):
        print("in-block")
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(); print('late-child')"],
                                 stdin=subprocess.PIPE)
    child.stdin.close()
    report(child_returncode=child.wait(timeout=60))


def main() -> None:
    scenario, *logs = sys.argv[1:]
    {"streams": streams, "exception": exception, "caught": caught, "system_exit": system_exit, "large": large,
     "nested": nested, "original": original, "lingering": lingering}[scenario](*logs)


if __name__ == "__main__":
    main()
