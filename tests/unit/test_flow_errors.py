"""A flow run's console: a user's error in one line, a bug with its traceback."""

import io
import logging
import sys

from flows.training import KnownErrorFormatter, quiet_known_errors
from ml.errors import DataError


def record_of(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:  # noqa: BLE001 - the record carries whatever was raised
        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed", None, sys.exc_info())


def test_known_errors_lose_their_traceback_only_on_the_console():
    formatter = KnownErrorFormatter(logging.Formatter("%(levelname)s %(message)s"))
    known, bug = record_of(DataError("data.source: no data rows in x.csv")), record_of(KeyError("oops"))
    assert formatter.format(known) == "ERROR Task run failed"
    assert "Traceback" in formatter.format(bug)
    # the same record still carries its traceback for the next handler (Prefect's API log)
    assert "Traceback" in logging.Formatter().format(known)


def test_quiet_known_errors_wraps_stream_handlers_once():
    logger = logging.getLogger("prefect.test-console")
    handler = logging.StreamHandler(io.StringIO())
    logger.addHandler(handler)
    others = [(h, h.formatter) for h in logging.getLogger().handlers]  # pytest's own, restored below
    try:
        quiet_known_errors()
        quiet_known_errors()
        assert isinstance(handler.formatter, KnownErrorFormatter)
        assert not isinstance(handler.formatter.inner, KnownErrorFormatter)
        logger.error("Task run failed", exc_info=record_of(DataError("bad")).exc_info)
        assert handler.stream.getvalue() == "Task run failed\n"
    finally:
        logger.removeHandler(handler)
        for other, formatter in others:
            other.setFormatter(formatter)


def test_the_next_commands_point_at_the_tracking_server_when_there_is_one():
    from flows.training import next_steps

    registered = {"model_name": "digits-classifier", "version": "3", "status": "PendingManualApproval",
                  "test_accuracy": 0.975, "dataset_md5": "abc.dir",
                  "pipeline_run_url": "http://tracking:5000/#/experiments/1/runs/r1"}
    local = next_steps(registered, local_store=True).splitlines()
    assert local[0] == "Registered digits-classifier version 3: PendingManualApproval"
    assert local[3].strip().startswith("make ui")
    server = next_steps(registered, local_store=False).splitlines()
    assert server[3].strip().startswith("http://tracking:5000/#/experiments/1/runs/r1")
    assert not any("make ui" in line for line in server)
    assert any("mlops lineage model digits-classifier 3" in line for line in server)
