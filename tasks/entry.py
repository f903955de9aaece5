"""What every stage shares: its MLflow run (nested under the pipeline run when there is one), its
console log, and its command-line entry."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ml.errors import PipelineError, cli_errors

# A pipeline run started outside this process (the Prefect flow sets it for its stages; set it by
# hand to group `dvc repro` stages under a run of your own).
PARENT_RUN_ENV = "MLOPS_PARENT_RUN_ID"


def flow_run_tags() -> dict[str, str]:
    """Links an MLflow run to the Prefect flow run it belongs to, when there is one."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return {}
    tags = {"prefect_flow_run_id": str(flow_run.id), "prefect_flow_name": str(flow_run.flow_name)}
    url = flow_run.ui_url
    if url:
        tags["prefect_flow_run_url"] = str(url)
    return tags


def parent_run_id(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get(PARENT_RUN_ENV) or None


@contextmanager
def stage_run(stage: str, *, tracking: Any = None, run_name: str | None = None, parent: str | None = None,
              tags: Mapping[str, Any] | None = None, system_metrics: bool = False,
              kind: str = "stage") -> Iterator[Any]:
    """An MLflow run for one stage, with the stage's stdout and stderr captured to
    ``console/<stage>.log`` among its artifacts, also when the stage fails (then the run is
    FAILED and tagged with the error); other libraries' notices and warnings go to that log only
    (:func:`console_to_run`). ``tracking`` defaults to the runtime settings' section."""
    from ml.settings import load_settings
    from ml.tracking.mlflow_tracker import MlflowTracker

    tracking = tracking or load_settings().tracking
    tracker = MlflowTracker.start(tracking, run_name or stage, tags={"stage": stage, **flow_run_tags(), **(tags or {})},
                                  parent_run_id=parent_run_id(parent), kind=kind, system_metrics=system_metrics)
    status = "FINISHED"
    try:
        with console_to_run(tracker, stage) as console:
            tracker.console = console  # where a progress bar writes past the log
            yield tracker
    except BaseException as exc:
        status = "FAILED"
        tracker.set_tags({"error": f"{exc.__class__.__name__}: {exc}"[:5000]})
        raise
    finally:
        tracker.close(status)


@contextmanager
def console_to_run(tracker: Any, name: str) -> Iterator[Any]:
    """Captures the console of a block to ``console/<name>.log`` among the artifacts of
    ``tracker``'s run, also when the block fails; other libraries' notices and warnings go to that
    log only (:func:`ml.tracking.console.capture_console`). Yields the capture."""
    from ml.tracking.console import capture_console

    log_dir = Path(tempfile.mkdtemp(prefix=f"mlops-{name}-"))
    log_file = log_dir / f"{name}.log"
    try:
        with capture_console(log_file, third_party_to_log=True) as console:
            yield console
    finally:
        try:
            if log_file.exists():
                tracker.log_artifact(log_file, "console")
        finally:
            log_file.unlink(missing_ok=True)
            log_dir.rmdir()


def stage_main(stage: str, run: Callable[..., dict[str, Any]], argv: list[str] | None = None,
               flags: Mapping[str, str] | None = None) -> None:
    """``python -m tasks.<stage> [--params params.yaml] [flags]``: runs the stage, prints its summary
    as JSON. ``flags`` maps extra boolean options (``--fresh``) to their help; each is passed to
    ``run`` as a keyword argument."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=f"Run the {stage} stage.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for flag, help_text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=help_text)
    args = parser.parse_args(argv)
    kwargs = {flag.lstrip("-").replace("-", "_"): getattr(args, flag.lstrip("-").replace("-", "_"))
              for flag in (flags or {})}
    summary = cli_errors(lambda path: run(path, **kwargs))(args.params)
    print(json.dumps({"stage": stage, **summary}, indent=2, default=str))


def should_retry(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry I/O failures, never a user's bad input (a
    :class:`PipelineError` is retried only when it says another try may succeed)."""
    try:
        state.result()
    except PipelineError as exc:
        return exc.retryable
    except Exception:  # noqa: BLE001 - anything else may be transient I/O
        return True
    return False
