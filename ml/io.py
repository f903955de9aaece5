"""Small file helpers: every output is written whole or not at all."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_path(path: str | Path) -> None:
    """Flushes a file's (or a directory's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Makes a rename inside ``path`` durable."""
    fsync_path(path)


def _scratch_name(path: Path, kind: str) -> Path:
    """A hidden name beside ``path`` (``.model.json.3f2a9c1b7e4d.tmp``): leftovers of a crash are
    recognisable by their dot and ``kind``."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.{kind}"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Calls ``write(tmp)`` on a temporary file beside ``path``, then renames it into place. The
    file gets the permissions of any new file under the process's umask (tempfile's 0600 would
    leave reports readable by their writer alone)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch_name(path, "tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def replace_dir(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Builds a directory with ``fill(tmpdir)`` and swaps it in for ``path`` only if that succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch_name(path, "new")
    tmp.mkdir(0o777)  # the umask applies, as to any new directory
    try:
        fill(tmp)
        old = None
        if path.exists():
            old = _scratch_name(path, "old")
            old.mkdir()
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_json(path: str | Path) -> Any:
    """A JSON file another stage wrote; a missing or unreadable one is a one-line DataError."""
    from ml.errors import DataError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found (run the stage that writes it first)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
