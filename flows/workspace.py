"""Each flow run of a deployment in a workspace of its own, so that two flow runs at once (two
workers of a pool, a tuning run beside a retraining run) never write each other's ``data/processed``,
``models/`` or ``reports/``, and the checkout a person works in is never written by them.

A workspace is a ``git worktree add --detach`` of the checkout's HEAD under ``workspace.root`` (the
settings, ml/settings.py), named after the flow run, with the checkout's uncommitted changes copied
in: the diff of tracked files (``git diff --binary HEAD``, applied with ``git apply``) and untracked
files git does not ignore. So the workspace sees the params.yaml, contract and code the person
meant, and the pipeline run records the same commit and dirty diff the checkout would. What git
ignores (data, models, reports, stores) is not copied: the flow makes its outputs itself.

In it:

- ``.dvc/cache`` is the checkout's DVC cache (``cache.dir`` in the workspace's ``.dvc/config.local``,
  what ``dvc cache dir --local`` writes, and a symbolic link at the default path, which
  tasks/validate.py reads for the champion's training split): ``dvc commit`` stores the outputs
  there, nothing is cached twice. The checkout's ``.dvc/config.local`` (its DVC remote) comes along;
  DVC's site cache (``core.site_cache_dir``) is inside the workspace, removed with it.
- data a user added with ``dvc add`` (``*.dvc`` files in git) is checked out from that cache, or
  pulled from the DVC remote when the cache lacks it.
- settings whose values are paths relative to the checkout (a SQLite tracking URI, the artifact
  root, spool and TensorBoard directory, a directory DVC remote, the file ``MLOPS_SETTINGS`` names)
  are made absolute in the environment (``MLOPS_<SECTION>__<KEY>``), so runs, models and pushed
  data land in the checkout's MLflow store and remote. ``checkpoint.dir`` stays relative: two runs
  of the same configuration must not share a rolling training tier, so checkpoints live in the
  workspace (or on S3). The cached choices of ``train.optimize: auto``
  (``checkpoint.autotune_cache_dir``) live in the workspaces' root unless set, so a deployment run
  does not measure again what an earlier one did.

A flow run that succeeds removes its workspace (``git worktree remove --force``); one that fails
keeps it for inspection and logs its path (remove it with ``git worktree remove --force PATH``; a
retry of the same flow run reuses it, so training resumes from its checkpoints).

``workspace.mode``: ``auto`` (the default) puts flow runs of a deployment (started by a Prefect
worker) in a workspace and leaves runs by hand (``python -m flows.training``, ``make run``) in the
checkout; ``checkout`` and ``worktree`` force one or the other. Prefect's pull steps run before the
flow and have no counterpart after it, so the flow enters and leaves its workspace itself
(:func:`in_workspace`), and removal happens only once the outcome is known.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ml.errors import PipelineError

# The workspace a flow run works in and its checkout, for its tags and child processes (not
# MLOPS_WORKSPACE: pydantic-settings reads that as the settings section).
WORKSPACE_ENV = "MLOPS_FLOW_WORKSPACE"
CHECKOUT_ENV = "MLOPS_FLOW_CHECKOUT"
DEFAULT_ROOT = Path("mlops-pipeline") / "workspaces"  # under $XDG_CACHE_HOME or ~/.cache

F = TypeVar("F", bound=Callable[..., Any])


class WorkspaceError(PipelineError):
    """A checkout a workspace cannot be made from, or a root it cannot be made in."""


@dataclass(frozen=True)
class Workspace:
    """A flow run's workspace: ``path`` is a worktree of ``checkout`` at ``commit``; ``copied``
    lists the checkout's uncommitted files brought into it."""

    path: Path
    checkout: Path
    commit: str
    copied: tuple[str, ...] = ()


def resolve_mode(mode: str, deployment_run: bool) -> str:
    """``checkout`` or ``worktree`` for a flow run (``auto``: a worktree for deployment runs)."""
    if mode == "auto":
        return "worktree" if deployment_run else "checkout"
    return mode


def workspace_root(root: str | None, checkout: Path) -> Path:
    """The directory workspaces are made in: ``root`` (relative to the checkout), or the user's cache."""
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
        return Path(cache) / DEFAULT_ROOT
    return (checkout / Path(root).expanduser()).resolve()


def _absolute(path: str, checkout: Path) -> str:
    return str((checkout / Path(path).expanduser()).resolve())


def _has_scheme(value: str) -> bool:
    head, sep, _ = value.partition("://")
    return bool(sep) and head.replace("+", "").replace(".", "").replace("-", "").isalnum()


def absolute_tracking_uri(uri: str, checkout: Path) -> str:
    """A SQLite or file tracking URI relative to the checkout made absolute; any other unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        return f"sqlite:///{_absolute(uri[len('sqlite:///'):], checkout)}"
    if uri.startswith("file:") or not _has_scheme(uri):
        local = uri.removeprefix("file://").removeprefix("file:")
        return Path(_absolute(local, checkout)).as_uri()
    return uri


def settings_environment(settings: Any, checkout: Path, environ: dict[str, str],
                         workspaces: Path | None = None) -> dict[str, str]:
    """The ``MLOPS_*`` variables that make ``settings`` (read in ``checkout``) mean the same in a
    workspace: each setting that is a path relative to the checkout, made absolute; and, unless it
    is set, ``checkpoint.autotune_cache_dir`` is the ``workspaces`` root, so the choices of
    ``train.optimize: auto`` outlive the workspace that measured them."""
    env = {
        "MLOPS_TRACKING__URI": absolute_tracking_uri(settings.tracking.uri, checkout),
        "MLOPS_TRACKING__SPOOL_DIR": _absolute(settings.tracking.spool_dir, checkout),
    }
    root = settings.tracking.artifact_root
    env["MLOPS_TRACKING__ARTIFACT_ROOT"] = root if _has_scheme(root) and not root.startswith("file:") \
        else _absolute(root.removeprefix("file://").removeprefix("file:"), checkout)
    url = settings.data_remote.url
    if url is not None and not url.startswith("s3://"):
        env["MLOPS_DATA_REMOTE__URL"] = _absolute(url, checkout)
    if environ.get("MLOPS_SETTINGS"):
        env["MLOPS_SETTINGS"] = _absolute(environ["MLOPS_SETTINGS"], checkout)
    if settings.tracking.tensorboard_dir is not None:
        env["MLOPS_TRACKING__TENSORBOARD_DIR"] = _absolute(settings.tracking.tensorboard_dir, checkout)
    cache = settings.checkpoint.autotune_cache_dir
    if cache is not None:
        env["MLOPS_CHECKPOINT__AUTOTUNE_CACHE_DIR"] = _absolute(cache, checkout)
    elif workspaces is not None:
        env["MLOPS_CHECKPOINT__AUTOTUNE_CACHE_DIR"] = str(workspaces)
    return env


def _git(args: list[str], cwd: Path, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(["git", *args], cwd=cwd, input=stdin, capture_output=True)
    if done.returncode != 0:
        raise WorkspaceError(f"git {' '.join(args[:2])} in {cwd} failed: "
                             f"{(done.stderr.decode(errors='replace').strip().splitlines() or ['?'])[-1]}")
    return done.stdout


def checkout_commit(checkout: Path) -> str:
    """HEAD of the git checkout at ``checkout``; one line when it is none, or has no commit."""
    try:
        inside = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=checkout, capture_output=True, text=True)
    except OSError as exc:
        raise WorkspaceError(f"workspace.mode worktree: git is not available ({exc})") from None
    if inside.returncode != 0:
        raise WorkspaceError(f"workspace.mode worktree: {checkout} is not a git checkout; expected one "
                             "(or workspace.mode: checkout)")
    head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD^{commit}"], cwd=checkout,
                          capture_output=True, text=True)
    if head.returncode != 0:
        raise WorkspaceError(f"workspace.mode worktree: {checkout} has no commit yet; expected one to check out")
    return head.stdout.strip()


def _is_worktree_of(path: Path, checkout: Path) -> bool:
    listing = _git(["worktree", "list", "--porcelain"], checkout).decode()
    return any(line == f"worktree {path}" for line in listing.splitlines())


def copy_uncommitted(checkout: Path, path: Path) -> tuple[str, ...]:
    """Brings the checkout's uncommitted tracked changes and untracked, not ignored files into the
    worktree at ``path``; returns their paths."""
    diff = _git(["diff", "--binary", "HEAD"], checkout)
    changed = _git(["diff", "--name-only", "-z", "HEAD"], checkout).decode().split("\0")
    if diff:
        _git(["apply", "--binary", "--whitespace=nowarn", "-"], path, stdin=diff)
    untracked = _git(["ls-files", "--others", "--exclude-standard", "-z"], checkout).decode().split("\0")
    for rel in filter(None, untracked):
        source, target = checkout / rel, path / rel
        if source.is_file() or source.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target, follow_symlinks=False)
    return tuple(sorted(filter(None, {*changed, *untracked})))


def dvc_cache_dir(checkout: Path) -> Path:
    """The checkout's DVC cache directory (``cache.dir`` of its DVC config, else ``.dvc/cache``)."""
    from dvc.config import Config

    dvc_dir = checkout / ".dvc"
    configured = Config(dvc_dir=str(dvc_dir), validate=False)["cache"].get("dir")
    return (dvc_dir / configured).resolve() if configured else (dvc_dir / "cache").resolve()


def share_dvc_cache(checkout: Path, path: Path) -> Path | None:
    """Points the workspace's DVC at the checkout's cache and remote (see the module docstring);
    returns the cache directory, or None when the checkout holds no DVC project."""
    from dvc.config import Config

    if not (checkout / ".dvc").is_dir() or not (path / ".dvc").is_dir():
        return None
    cache = dvc_cache_dir(checkout)
    cache.mkdir(parents=True, exist_ok=True)
    local = checkout / ".dvc" / "config.local"
    if local.is_file():
        shutil.copy2(local, path / ".dvc" / "config.local")
    with Config(dvc_dir=str(path / ".dvc"), validate=False).edit("local") as conf:
        conf["cache"]["dir"] = str(cache)
        # DVC's per-repository state and index (by default under /var/tmp/dvc, one per repository
        # path) go with the workspace instead of piling up there, one per flow run
        conf["core"]["site_cache_dir"] = str(path / ".dvc" / "tmp" / "site-cache")
    link = path / ".dvc" / "cache"
    if not link.is_symlink():
        if link.is_dir():
            shutil.rmtree(link)
        link.symlink_to(cache, target_is_directory=True)
    return cache


def pull_dvc_inputs(path: Path) -> tuple[str, ...]:
    """Checks out the data of the ``*.dvc`` files in git from the shared cache, pulling from the DVC
    remote what the cache lacks; returns the ``.dvc`` files."""
    targets = tuple(t for t in _git(["ls-files", "-z", "--", "*.dvc"], path).decode().split("\0") if t)
    if not targets:
        return targets
    from dvc.exceptions import CheckoutError, DvcException
    from dvc.repo import Repo

    paths = [str(path / t) for t in targets]  # DVC reads relative targets from the working directory
    with Repo(str(path)) as repo:
        try:
            repo.checkout(targets=paths)
        except CheckoutError:
            try:
                repo.pull(targets=paths)
            except DvcException as exc:
                raise WorkspaceError(f"workspace {path}: the data of {', '.join(targets)} is neither in the DVC "
                                     f"cache nor on the DVC remote ({str(exc).splitlines()[0]})") from None
    return targets


def create_workspace(checkout: Path, root: Path, name: str) -> Workspace:
    """The workspace ``root/name`` of ``checkout`` (see the module docstring); an existing one of the
    same name (a retry of the same flow run) is used as it is."""
    checkout = checkout.resolve()
    commit = checkout_commit(checkout)
    path = (root / name).resolve()
    if path.exists():
        if not _is_worktree_of(path, checkout):
            raise WorkspaceError(f"workspace {path} exists and is not a worktree of {checkout}; "
                                 "expected a free path under workspace.root")
        kept = _git(["rev-parse", "HEAD"], path).decode().strip()
        return Workspace(path, checkout, kept)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkspaceError(f"workspace.root {root}: cannot create it ({exc.strerror})") from None
    _git(["worktree", "add", "--detach", "--quiet", str(path), commit], checkout)
    try:
        copied = copy_uncommitted(checkout, path)
        share_dvc_cache(checkout, path)
        pull_dvc_inputs(path)
    except BaseException:
        remove_workspace(Workspace(path, checkout, commit))
        raise
    return Workspace(path, checkout, commit, copied)


def remove_workspace(workspace: Workspace) -> None:
    """Removes the worktree and its administrative files (the shared cache behind the symbolic link
    stays: git removes the link, not what it points to)."""
    _git(["worktree", "remove", "--force", "--force", str(workspace.path)], workspace.checkout)
    _git(["worktree", "prune"], workspace.checkout)


def prepare_tracking_store(tracking: Any) -> None:
    """Creates the MLflow store's schema and the experiment, one flow run at a time, on a local
    SQLite store: MLflow creates both on first use without a lock of its own, so two flow runs that
    start together on a fresh store would both try to (``table ... already exists``). The lock is an
    advisory ``flock`` on the database file, which SQLite's own (POSIX) locks do not see."""
    import fcntl

    from ml.tracking.mlflow_tracker import configure_mlflow, ensure_experiment

    if not tracking.uri.startswith("sqlite:////"):
        return
    database = Path(tracking.uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with database.open("ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            ensure_experiment(configure_mlflow(tracking), tracking)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _flow_run() -> tuple[str | None, bool]:
    """This flow run's id and whether a deployment started it (None, False outside a flow run)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = getattr(ctx, "flow_run", None)
    if run is None:
        return None, False
    return str(run.id), run.deployment_id is not None


@contextmanager
def flow_workspace() -> Iterator[Workspace | None]:
    """Runs the body in this flow run's workspace when ``workspace.mode`` asks for one (yields it),
    else in the working directory as it is (yields None). See the module docstring."""
    from ml.settings import load_settings

    settings = load_settings()
    run_id, deployment_run = _flow_run()
    if os.environ.get(WORKSPACE_ENV) or resolve_mode(settings.workspace.mode, deployment_run) == "checkout":
        yield None
        return
    checkout = Path.cwd().resolve()
    root = workspace_root(settings.workspace.root, checkout)
    env = settings_environment(settings, checkout, dict(os.environ), root)
    prepare_tracking_store(settings.tracking.model_copy(update={
        "uri": env["MLOPS_TRACKING__URI"], "artifact_root": env["MLOPS_TRACKING__ARTIFACT_ROOT"]}))
    workspace = create_workspace(checkout, root, run_id or uuid.uuid4().hex)
    env.update({WORKSPACE_ENV: str(workspace.path), CHECKOUT_ENV: str(checkout)})
    saved = {key: os.environ.get(key) for key in env}
    print(f"workspace {workspace.path}: {checkout} at {workspace.commit[:12]}"
          + (f" with {len(workspace.copied)} uncommitted files" if workspace.copied else ""))
    os.environ.update(env)
    os.chdir(workspace.path)
    succeeded = False
    try:
        yield workspace
        succeeded = True
    finally:
        os.chdir(checkout)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if succeeded:
            remove_workspace(workspace)
            print(f"workspace {workspace.path} removed")
        else:
            print(f"workspace {workspace.path} kept for inspection; remove it with "
                  f"`git -C {checkout} worktree remove --force {workspace.path}`")


def in_workspace(fn: F) -> F:
    """Runs a flow function in :func:`flow_workspace` (put it under ``@flow``: Prefect reads the
    parameters through ``functools.wraps``)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with flow_workspace():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def workspace_tags() -> dict[str, str]:
    """The workspace and checkout of the current flow run, for its pipeline run's tags ({} in the checkout)."""
    path = os.environ.get(WORKSPACE_ENV)
    if not path:
        return {}
    return {"workspace": path, "workspace_checkout": os.environ.get(CHECKOUT_ENV, "")}
