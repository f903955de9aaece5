"""The DVC remote of the pipeline's data and model outputs, configured from the ``data_remote``
settings section: ``dvc push`` after the training flow's ``dvc commit``, ``dvc pull`` in another
clone.

The remote is written to ``.dvc/config.local`` (git-ignored) as the default remote, through DVC's
own config API (what ``dvc remote add -d --local`` and ``dvc remote modify --local NAME endpointurl``
do), so the committed ``.dvc/config`` stays the same on every machine and each machine may point at
its own bucket or endpoint. Credentials are the usual AWS ones (``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance role), read by boto3 for the check and by
DVC's S3 filesystem for the transfer; none is written to a config file.

A remote that cannot take a push (missing bucket or directory, refused credentials) is a
:class:`RemoteRefused`: permanent, so the flow does not retry it. Any other failed transfer is a
:class:`DataRemoteError`, worth a retry. DVC is imported when a function runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ml.errors import PipelineError
from ml.settings import DataRemoteConfig
from ml.storage import check_bucket, is_s3_url

LOCK = "dvc.lock"
LOCK_ARTIFACT_DIR = "dvc"  # where the training flow logs its dvc.lock in the pipeline run


class DataRemoteError(PipelineError):
    """A ``dvc push`` or ``dvc pull`` that failed; another try may succeed."""

    retryable = True


class RemoteRefused(DataRemoteError):
    """The remote cannot be used as configured: a missing bucket or directory, refused credentials."""

    retryable = False


class DataNotPushed(DataRemoteError):
    """The training flow registered a version but could not push its data: the version stays
    registered, its data only in the local DVC cache until ``dvc push`` succeeds."""

    exit_code = 5


def describe(cfg: DataRemoteConfig) -> str:
    """``DVC remote storage (s3://bucket/prefix)``: how messages name the remote."""
    return f"DVC remote {cfg.name} ({cfg.url})"


def remote_url(cfg: DataRemoteConfig, cwd: str | Path = ".") -> str:
    """The remote's URL as DVC is given it: an S3 URL as it is, a directory made absolute (DVC reads a
    relative path in .dvc/config.local relative to .dvc/, settings relative to the working directory)."""
    if cfg.url is None:
        raise RemoteRefused("data_remote.url is not set (settings.yaml or MLOPS_DATA_REMOTE__URL): "
                            "expected the DVC remote's s3://bucket/prefix or directory")
    if is_s3_url(cfg.url):
        return cfg.url
    return str((Path(cwd) / Path(cfg.url).expanduser()).resolve())


def check_remote(cfg: DataRemoteConfig, cwd: str | Path = ".") -> None:
    """Raises :class:`RemoteRefused` (one line naming the remote and its bucket or directory) unless
    the remote can take a push: the bucket exists and this process's credentials may read it, or the
    directory exists or can be made (DVC makes it). An S3 endpoint that does not answer is a
    :class:`DataRemoteError`: it may answer the next try."""
    url = remote_url(cfg, cwd)
    if is_s3_url(url):
        check_bucket(url, cfg.endpoint_url, label=f"DVC remote {cfg.name}", error=RemoteRefused,
                     unreachable=DataRemoteError)
        return
    path = Path(url)
    if path.exists() and not path.is_dir():
        raise RemoteRefused(f"{describe(cfg)}: {path} is a file; expected a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RemoteRefused(f"{describe(cfg)}: {existing} is not writable by this user")


def apply_remote(cfg: DataRemoteConfig, repo_dir: str | Path = ".") -> str:
    """Writes the remote into ``repo_dir/.dvc/config.local`` as the default remote; returns its URL.

    Only the remote's ``url`` and ``endpointurl`` are set (the endpoint removed when the setting is
    null); other options a user gave the same remote there by hand are kept.
    """
    from dvc.repo import Repo

    url = remote_url(cfg, repo_dir)
    with Repo(str(repo_dir)) as repo, repo.config.edit("local") as conf:
        remote = dict(conf["remote"].get(cfg.name, {}))
        remote["url"] = url
        if cfg.endpoint_url and is_s3_url(url):
            remote["endpointurl"] = cfg.endpoint_url
        else:
            remote.pop("endpointurl", None)
        conf["remote"][cfg.name] = remote
        conf["core"]["remote"] = cfg.name
    return url


def _transfer_errors() -> tuple[type[BaseException], ...]:
    """What a transfer raises for a remote's fault: DVC's own errors, and what its S3 filesystem
    (s3fs over aiobotocore) raises as they come: OSError subclasses (FileNotFoundError for a
    missing bucket, PermissionError for refused credentials) or botocore's."""
    from botocore.exceptions import BotoCoreError, ClientError
    from dvc.exceptions import DvcException

    return DvcException, OSError, BotoCoreError, ClientError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return text.splitlines()[0]


def _failed(cfg: DataRemoteConfig, action: str, exc: BaseException, cwd: str | Path) -> DataRemoteError:
    """The error for a failed transfer: the remote's refusal when a check finds one, else DVC's own line."""
    try:
        check_remote(cfg, cwd)
    except RemoteRefused as refused:
        return RemoteRefused(f"dvc {action} refused: {refused}")
    except DataRemoteError as unreachable:
        return DataRemoteError(f"dvc {action} failed: {unreachable}")
    if isinstance(exc, DataRemoteError):
        return DataRemoteError(f"dvc {action} from {describe(cfg)} failed: {exc}")
    cause = exc.__cause__ or exc.__context__
    detail = _first_line(exc) + (f" ({_first_line(cause)})" if cause is not None else "")
    return DataRemoteError(f"dvc {action} {'to' if action == 'push' else 'from'} {describe(cfg)} failed: {detail}")


def push(cfg: DataRemoteConfig, repo_dir: str | Path = ".") -> int:
    """``dvc push`` of every cached output dvc.lock records to the remote (applied first); returns
    how many files were uploaded (0 when the remote had them all)."""
    from dvc.repo import Repo

    apply_remote(cfg, repo_dir)
    try:
        with Repo(str(repo_dir)) as repo:
            return int(repo.push(remote=cfg.name))
    except _transfer_errors() as exc:
        raise _failed(cfg, "push", exc, repo_dir) from None


def pull(cfg: DataRemoteConfig, repo_dir: str | Path = ".", force: bool = False) -> dict[str, Any]:
    """``dvc pull`` of every cached output dvc.lock records, from the remote (applied first) into
    the workspace; ``force`` overwrites workspace outputs that differ. Returns DVC's checkout counts
    and ``fetched``, the files downloaded.

    Done as ``dvc fetch`` then ``dvc checkout`` (what ``dvc pull`` does in one call), so a fetch that
    fails leaves the workspace untouched: DVC's pull goes on to check out what it has, which with
    ``force`` removes workspace outputs the remote could not provide.
    """
    from dvc.repo import Repo

    apply_remote(cfg, repo_dir)
    try:
        with Repo(str(repo_dir)) as repo:
            fetched = repo.fetch(remote=cfg.name)
            absent = not_in_cache(repo)
            if absent:
                raise _failed(cfg, "pull", DataRemoteError(f"{', '.join(absent)}: not there (never pushed?)"), repo_dir)
            return {**dict(repo.checkout(force=force)), "fetched": int(fetched)}
    except _transfer_errors() as exc:
        raise _failed(cfg, "pull", exc, repo_dir) from None


def not_in_cache(repo: Any) -> list[str]:
    """The cached outputs dvc.lock records whose object, or a file of whose directory, is not in the
    local DVC cache. ``dvc fetch`` only warns about objects the remote lacks, and a checkout of
    them would remove the workspace's copy first."""
    from dvc_data.hashfile.tree import Tree

    absent = []
    for out in repo.index.outs:
        if not out.use_cache or not out.hash_info:
            continue
        obj = None if out.changed_cache() else out.get_obj()
        if obj is None or (isinstance(obj, Tree) and not all(out.cache.exists(oid.value) for _, _, oid in obj)):
            absent.append(str(out))
    return absent


def locked_out(lock_text: str, md5: str) -> str:
    """The path of the output that a dvc.lock records with ``md5`` (a dataset version's DVC md5)."""
    import yaml

    stages = (yaml.safe_load(lock_text) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("md5") == md5:
                return out["path"]
    raise DataRemoteError(f"the dvc.lock records no output with md5 {md5}")


def pull_lock(cfg: DataRemoteConfig, lock_text: str, md5: str, repo_dir: str | Path = ".",
              force: bool = False) -> tuple[str, dict[str, Any]]:
    """Makes ``lock_text`` the checkout's dvc.lock and pulls what it records from the remote, then
    checks that the output it records with ``md5`` has that md5 in the workspace.

    The checkout's own dvc.lock, when it records anything else, is replaced only with ``force``
    (which also lets DVC overwrite workspace outputs that differ); if the pull fails, the previous
    lock is put back (or removed when there was none), so a failed pull changes no record.
    Returns the output's path and DVC's counts.
    """
    from ml.io import atomic_write_text
    from ml.provenance import dir_md5

    path = locked_out(lock_text, md5)
    lock = Path(repo_dir) / LOCK
    previous = lock.read_text() if lock.is_file() else None
    if previous is not None and previous != lock_text and not force:
        raise DataRemoteError(f"{lock} records other outputs than the version's; --force replaces it and "
                              "the workspace outputs that differ")
    atomic_write_text(lock, lock_text)
    try:
        stats = pull(cfg, repo_dir, force=force)
    except BaseException:
        if previous is None:
            lock.unlink(missing_ok=True)
        else:
            atomic_write_text(lock, previous)
        raise
    found = dir_md5(Path(repo_dir) / path)
    if found != md5:
        raise DataRemoteError(f"{path} pulled from {describe(cfg)} has md5 {found}; expected {md5}")
    return path, stats
