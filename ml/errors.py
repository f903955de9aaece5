"""Errors a user can cause. Entry points print them as one line and exit non-zero; anything else
is a bug and keeps its traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any


class PipelineError(Exception):
    """A problem with the user's input: params, data, or a registry request."""

    exit_code = 2
    # Whether another try of the same call may succeed (a transfer that failed, not bad input):
    # what Prefect's retry condition (tasks.entry.should_retry) asks.
    retryable = False


class ConfigError(PipelineError):
    """params.yaml: an unknown, missing or out-of-range key."""


class DataError(PipelineError):
    """The raw data source: missing file, missing label column, non-numeric features."""


class ValidationFailed(PipelineError):
    """The data gate: one or more expectations failed."""

    exit_code = 3


class QualityGateFailed(PipelineError):
    """The trained model is below the registration thresholds."""

    exit_code = 4


class RegistryError(PipelineError):
    """An illegal registry request: unknown version, illegal transition, unauthorized approver."""


def cli_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a ``main()`` so a :class:`PipelineError` ends as ``error: <message>`` and its exit code."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None

    return wrapper
