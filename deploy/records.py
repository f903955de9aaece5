"""Deployment records: which endpoint served which model version, from when. Lineage reads them.

One append-only JSON-lines file per endpoint under ``serve.records_dir``; each line is one event
(``start``, ``switch`` when the followed alias moved, ``stop``). Lines are appended with O_APPEND
and fsync'd, so a crash leaves at most a torn last line, which readers skip.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from ml.errors import ConfigError

EVENTS = ("start", "switch", "stop")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass(frozen=True)
class DeploymentRecord:
    endpoint: str
    event: str
    url: str
    model_name: str
    model_version: str
    model_uri: str
    run_id: str
    tracking_uri: str
    at: str
    host: str
    pid: int

    def to_dict(self) -> dict:
        return asdict(self)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_endpoint_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"endpoint name {name!r}: expected letters, digits, '_', '.', '-' (at most 100)")
    return name


def records_file(records_dir: str | Path, endpoint: str) -> Path:
    return Path(records_dir) / f"{check_endpoint_name(endpoint)}.jsonl"


def append_record(records_dir: str | Path, record: DeploymentRecord) -> None:
    if record.event not in EVENTS:
        raise ValueError(f"deployment event {record.event!r}: expected one of {', '.join(EVENTS)}")
    path = records_file(records_dir, record.endpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record.to_dict(), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(records_dir: str | Path, endpoint: str | None = None) -> list[DeploymentRecord]:
    """Every record, oldest first (of one endpoint, or of all, each endpoint's in order)."""
    directory = Path(records_dir)
    paths = [records_file(directory, endpoint)] if endpoint else sorted(directory.glob("*.jsonl"))
    names = {f.name for f in fields(DeploymentRecord)}
    out: list[DeploymentRecord] = []
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
            if isinstance(raw, dict) and set(raw) == names:
                out.append(DeploymentRecord(**raw))
    return out


def endpoints(records_dir: str | Path) -> list[str]:
    return sorted(p.stem for p in Path(records_dir).glob("*.jsonl"))


def current(records_dir: str | Path, endpoint: str) -> DeploymentRecord | None:
    """The model version the endpoint serves now, or last served (its newest start/switch record)."""
    serving = [r for r in read_records(records_dir, endpoint) if r.event != "stop"]
    return serving[-1] if serving else None
