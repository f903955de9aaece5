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


def third_party(log: str) -> None:
    """Another library's logger (with a handler of its own, propagating to the root's too, as DVC's
    does) and warnings raised from its code, against the project's own."""
    from ml.tracking import console

    logging.basicConfig(format="root| %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    library = logging.getLogger("thirdlib.checks")
    library.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("own| %(message)s"))
    logging.getLogger("thirdlib").addHandler(handler)
    logging.getLogger("prefect.task_runs").setLevel(logging.INFO)
    showwarning = warnings.showwarning
    own_file = console.__file__  # a file of the project's packages
    with capture_console(log, third_party_to_log=True):
        print("stage-line")
        library.info("library-info")
        library.warning("library-warning")
        library.error("library-error")
        logging.getLogger("ml.train.stage").warning("own-warning")
        logging.getLogger("prefect.task_runs").info("task-run-state")
        warnings.warn_explicit("library-userwarning", UserWarning, "/opt/site-packages/thirdlib/data.py", 7)
        warnings.warn_explicit("own-userwarning", UserWarning, own_file, 1)
        late = logging.getLogger("latelib")  # a library that adds its console handler on import, as DVC does
        late.addHandler(logging.StreamHandler(sys.stdout))
        late.setLevel(logging.INFO)
        late.info("late-library-info")
        subprocess.run([sys.executable, "-c", CHILD], check=True)
    library.warning("library-after-block")
    warnings.warn_explicit("library-userwarning-after", UserWarning, "/opt/site-packages/thirdlib/data.py", 8)
    report(showwarning_restored=warnings.showwarning is showwarning,
           filters_removed=not handler.filters and not any(h.filters for h in logging.getLogger().handlers)
           and not logging.getLogger("latelib").handlers[0].filters,
           record_factory_restored=logging.getLogRecordFactory() is logging.LogRecord)


def main() -> None:
    scenario, *logs = sys.argv[1:]
    {"streams": streams, "exception": exception, "caught": caught, "system_exit": system_exit, "large": large,
     "nested": nested, "original": original, "lingering": lingering,
     "third_party": third_party}[scenario](*logs)


if __name__ == "__main__":
    main()
