"""Identity of code and data: the git commit, and the dataset version as DVC computes it."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class GitInfo:
    commit: str
    branch: str
    dirty: bool

    @classmethod
    def unknown(cls) -> GitInfo:
        return cls("unknown", "unknown", False)


def _git(args: list[str], cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def git_info(cwd: str | Path = ".") -> GitInfo:
    """The commit, branch and dirty flag of the checkout at ``cwd`` ("unknown" outside git)."""
    cwd = Path(cwd)
    try:
        commit = _git(["rev-parse", "HEAD"], cwd)
        branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], cwd)
        dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], cwd))
    except (OSError, subprocess.CalledProcessError):
        return GitInfo.unknown()
    return GitInfo(commit, branch, dirty)


def git_diff(cwd: str | Path = ".") -> str:
    """The uncommitted diff of tracked files ('' when clean or outside git)."""
    try:
        return _git(["diff", "HEAD"], Path(cwd))
    except (OSError, subprocess.CalledProcessError):
        return ""


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dir_md5(path: str | Path) -> str:
    """DVC's hash of a directory output: md5 of the sorted JSON list of its files' md5s, plus ``.dir``.

    Computed the way ``dvc commit`` does, so it equals the md5 that dvc.lock records for the same
    content (a test checks this against a real ``dvc repro``).
    """
    root = Path(path)
    entries = sorted(
        ({"md5": file_md5(p), "relpath": p.relative_to(root).as_posix()}
         for p in root.rglob("*") if p.is_file()),
        key=lambda e: e["relpath"],
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def locked_md5(out: str, lock_file: str | Path = "dvc.lock") -> str | None:
    """The md5 dvc.lock records for the output ``out`` (None without a lock entry)."""
    lock_file = Path(lock_file)
    if not lock_file.is_file():
        return None
    lock = yaml.safe_load(lock_file.read_text()) or {}
    for stage in (lock.get("stages") or {}).values():
        for entry in stage.get("outs", []):
            if entry.get("path") == out:
                return entry.get("md5")
    return None


@dataclass(frozen=True)
class DatasetVersion:
    """What names a dataset version across the pipeline: the DVC md5 of the processed splits, the
    raw source, and the commit that produced them."""

    md5: str
    path: str
    source: str
    git_commit: str
    locked: bool

    def to_dict(self) -> dict:
        return asdict(self)


def dataset_version(processed_dir: str | Path, source: str, cwd: str | Path = ".") -> DatasetVersion:
    """The version of ``processed_dir`` as it is on disk; ``locked`` says dvc.lock agrees with it."""
    md5 = dir_md5(processed_dir)
    rel = Path(processed_dir).as_posix()
    return DatasetVersion(md5=md5, path=rel, source=source, git_commit=git_info(cwd).commit,
                          locked=locked_md5(rel, Path(cwd) / "dvc.lock") == md5)
