"""capture_console works on file descriptors, which pytest's own capture replaces, so every
scenario runs in a child process (tests/unit/console_child.py) whose stdout/stderr are pipes here."""

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml.tracking.console import capture_console

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("console_child.py")


def run_child(scenario, *logs, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, str(CHILD), scenario, *map(str, logs)], stdout=stdout, stderr=stderr,
                          env=env, timeout=120)


def observations(result):
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


def test_print_logging_raw_fds_warnings_and_children_reach_terminal_and_log(tmp_path):
    log = tmp_path / "logs" / "stage.log"
    result = run_child("streams", log)
    assert result.returncode == 0, result.stderr.decode()
    text = log.read_text(encoding="utf-8")
    out, err = result.stdout.decode(), result.stderr.decode()
    for line in ("print-to-stdout", "raw-fd-1", "child-stdout", "unicode-\u00e9\u4e2d"):
        assert line in text and line in out
    for line in ("logging-to-stderr", "raw-fd-2", "UserWarning: warning-text", "child-stderr"):
        assert line in text and line in err
    assert "after-block" in out and "after-block" not in text
    assert "after-block-log" in err and "after-block-log" not in text
    assert observations(result) == {"fds_restored": True, "no_fd_leak": True}
    # One stream keeps its order in the log.
    assert text.index("print-to-stdout") < text.index("raw-fd-1") < text.index("child-stdout")


def test_exception_traceback_is_logged_and_the_exception_propagates(tmp_path):
    log = tmp_path / "stage.log"
    result = run_child("exception", log)
    assert result.returncode == 1
    text = log.read_text()
    assert "before-error" in text
    assert "Traceback (most recent call last):" in text and text.rstrip().endswith("ValueError: boom-message")
    # The interpreter printed the traceback to the real stderr, once.
    assert result.stderr.decode().count("ValueError: boom-message") == 1


def test_after_a_caught_exception_fds_are_restored(tmp_path):
    log = tmp_path / "stage.log"
    result = run_child("caught", log)
    assert result.returncode == 0, result.stderr.decode()
    assert observations(result) == {"caught": "KeyError('caught-key')", "fds_restored": True, "no_fd_leak": True}
    assert "KeyError: 'caught-key'" in log.read_text()


def test_system_exit_message_is_logged_without_a_traceback(tmp_path):
    log = tmp_path / "stage.log"
    result = run_child("system_exit", log)
    assert result.returncode == 1
    assert log.read_text() == "fatal: stage failed\n"


def test_large_output_does_not_deadlock_and_nothing_is_lost(tmp_path):
    log = tmp_path / "stage.log"
    result = run_child("large", log)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    text = log.read_text()
    assert text.count("x" * 99 + "\n") == 80_000 and text.count("y") == 2_000_000
    assert result.stdout.count(b"x" * 99 + b"\n") == 40_000 and result.stderr.count(b"x" * 99 + b"\n") == 40_000
    assert result.stdout.count(b"y") == 2_000_000


def test_nested_captures(tmp_path):
    outer, inner = tmp_path / "outer.log", tmp_path / "inner.log"
    result = run_child("nested", outer, inner)
    assert result.returncode == 0, result.stderr.decode()
    assert sorted(inner.read_text().split()) == ["inner-fd-2", "inner-only"]  # two streams: any interleaving
    assert outer.read_text().split("\n")[0] == "outer-first"
    assert {"outer-first", "inner-only", "inner-fd-2", "outer-last"} <= set(outer.read_text().split())
    assert result.stdout.decode().split()[:3] == ["outer-first", "inner-only", "outer-last"]
    assert observations(result) == {"fds_restored": True}


def test_original_stream_bypasses_the_log(tmp_path):
    log = tmp_path / "stage.log"
    result = run_child("original", log)
    assert result.returncode == 0, result.stderr.decode()
    assert log.read_text() == "both-places\n"
    assert "terminal-only" in result.stdout.decode() and "both-places" in result.stdout.decode()
    assert observations(result) == {"isatty_after": False, "captured_isatty": False, "original_isatty": False}


def test_on_a_terminal_the_original_stream_is_still_a_tty(tmp_path):
    log = tmp_path / "stage.log"
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, str(CHILD), "original", str(log)], stdin=slave, stdout=slave,
                               stderr=slave, env=env)
    os.close(slave)
    output, deadline = b"", time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every process holding the terminal has exited
                    break
                if not chunk:
                    break
                output += chunk
    finally:
        os.close(master)
    assert process.wait(timeout=60) == 0, output.decode(errors="replace")
    text = output.decode().replace("\r\n", "\n")
    assert "terminal-only" in text and "both-places" in text
    assert json.loads(text.strip().splitlines()[-1]) == {"isatty_after": True, "captured_isatty": False,
                                                          "original_isatty": True}
    assert log.read_text() == "both-places\n"


def test_a_child_outliving_the_block_is_not_broken(tmp_path):
    log = tmp_path / "stage.log"
    result = run_child("lingering", log)
    assert result.returncode == 0, result.stderr.decode()
    assert observations(result) == {"child_returncode": 0}
    assert log.read_text() == "in-block\n"


def test_append_mode_keeps_earlier_content(tmp_path):
    log = tmp_path / "stage.log"
    log.write_text("earlier\n")
    # No fd output happens in this process: the capture is opened and closed around nothing.
    with capture_console(log, append=True):
        pass
    assert log.read_text() == "earlier\n"
    with capture_console(log):
        pass
    assert log.read_text() == ""


def test_third_party_output_goes_to_the_log_only_and_the_projects_own_to_both(tmp_path):
    log = tmp_path / "stage.log"
    result = run_child("third_party", log)
    assert result.returncode == 0, result.stderr.decode()
    text, out, err = log.read_text(), result.stdout.decode(), result.stderr.decode()
    terminal = out + err
    for line in ("stage-line", "library-error", "own-warning", "task-run-state", "own-userwarning", "child-stdout",
                 "child-stderr"):
        assert line in text and line in terminal, line
    for line in ("library-info", "library-warning", "library-userwarning", "late-library-info"):
        assert line in text and line not in terminal.replace("library-userwarning-after", ""), line
    # formatted by the library's handler, once although two handlers print it
    assert "own| library-info" in text and "root| thirdlib.checks INFO library-info" not in text
    assert "data.py:7: UserWarning: library-userwarning" in text
    # after the block the library speaks on the terminal again, and nothing is left installed
    assert "library-after-block" in err and "library-userwarning-after" in err
    assert "after" not in text
    assert observations(result) == {"showwarning_restored": True, "filters_removed": True,
                                    "record_factory_restored": True}


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"^drain_timeout_s: expected a number >= 0, got -1$"):
        capture_console(tmp_path / "x.log", drain_timeout_s=-1)
    capture = capture_console(tmp_path / "x.log")
    with pytest.raises(RuntimeError, match="inside the block only"):
        capture.original()
