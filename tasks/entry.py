"""The command-line entry shared by every stage module."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ml.errors import PipelineError, cli_errors


def stage_main(stage: str, run: Callable[[str], dict[str, Any]], argv: list[str] | None = None) -> None:
    """``python -m tasks.<stage> [--params params.yaml]``: runs the stage, prints its summary as JSON."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=f"Run the {stage} stage.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    summary = cli_errors(run)(args.params)
    print(json.dumps({"stage": stage, **summary}, indent=2, default=str))


def should_retry(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry I/O failures, never a user's bad input."""
    try:
        state.result()
    except PipelineError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient I/O
        return True
    return False
