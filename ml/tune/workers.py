"""Tuning in parallel: worker processes run the trials of one Optuna study (RDB storage) until this
invocation has ``tune.n_trials`` new ones, each trial an MLflow run nested in the study run.

    pool = WorkerPool("params.yaml", workers=2)
    outcome = run_study(study, context, study_run, optimize=pool.optimize)   # ml.tune.study

Worker 0 is the stage's own process, which has the study, the trial inputs and its imports (torch,
MLflow, Optuna: about two seconds of a new process) at hand, so it starts trials at once; every other
worker is ``python -m ml.tune.workers`` in the same working directory and environment: it loads the
study and the trial inputs itself and calls ``study.optimize``, so Optuna's storage is what the
workers share. Each works with its share of the cores as torch's threads (``OMP_NUM_THREADS``).
Trial numbers stay unique because Optuna's RDB storage numbers a new trial under a row lock on its
study; the median pruner compares a trial with the intermediate values of every worker's trials,
since they are all in that storage.

The budget is counted here rather than with ``optuna.study.MaxTrialsCallback``: that callback counts
every trial of the study, so invocations on two machines sharing a study would end each other's,
and two workers finishing at the same moment would both pass its check and start a trial each past
the budget. Here a worker takes a file lock shared by this invocation's workers, counts the trials
tagged with the invocation (user attr ``tune_invocation``: the study run's id), and keeps the lock
through Optuna's ``ask()`` until the new trial carries the tag, so counting and creating are one step.

A worker that dies (SIGKILL, the OOM killer) leaves its trial RUNNING. Its trial still counts, so the
other workers finish the rest of the budget; once every worker has ended, the pool marks such trials
FAIL, their MLflow runs KILLED, and removes their partial trial directories. A worker on another
machine that dies is caught by Optuna's heartbeat instead (``ml.tune.study.HEARTBEAT_S``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ml.config import Params
from ml.errors import ConfigError, PipelineError, cli_errors
from ml.tune.study import RUN_ID_ATTR, STATE_TAG, StudyContext, open_study, redacted_storage, run_trial, trial_dir

logger = logging.getLogger(__name__)

INVOCATION_ATTR = "tune_invocation"
WORKER_ATTR = "tune_worker"
LOCK_FILE = ".workers.lock"
STOP_GRACE_S = 30


def is_in_memory(storage: str | None) -> bool:
    """Whether ``storage`` lives in one process only: None (Optuna's in-memory storage) or an in-memory SQLite URL."""
    if storage is None:
        return True
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
    except ArgumentError:
        return False
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def check_workers(workers: int, storage: str | None) -> None:
    """One line unless ``workers`` processes can share the study in ``storage``."""
    if workers < 1:
        raise ConfigError(f"--workers: expected a number of worker processes >= 1, got {workers}")
    if workers > 1 and is_in_memory(storage):
        shown = "None" if storage is None else storage if "@" not in storage else redacted_storage(storage)
        raise ConfigError(f"--workers {workers}: tune.storage {shown} is in memory, which worker processes cannot "
                          "share; expected a file (sqlite:///optuna.db) or a database server (postgresql://host/db)")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def study_context(params: Params, tracking: Any, study_run_id: str, tags: dict[str, Any],
                  dataset: Any = None, git: Any = None) -> StudyContext:
    """What every trial needs, read from ``params.data.processed_dir`` (``dataset`` and ``git``
    computed when not given): the inputs the stage and each worker build the same way."""
    import pandas as pd

    from ml.data.prepare import Schema
    from ml.provenance import dataset_version, git_info
    from ml.tracking.mlflow_tracker import MlflowTracker

    processed = Path(params.data.processed_dir)
    dataset = dataset or dataset_version(processed, Schema.read(processed).source)
    train_frame = pd.read_parquet(processed / "train.parquet")
    example = pd.read_parquet(processed / "val.parquet").drop(columns=["label"]).head(5)
    return StudyContext(params, study_run_id, dataset, git or git_info(), train_frame,
                        example.to_numpy(dtype="float32").copy(), MlflowTracker.start, tags, tracking)


class Budget:
    """This invocation's ``n`` trials, shared by its workers through a lock file: :meth:`take` holds
    the lock when a trial may start, :meth:`claim` tags the new trial and lets the lock go."""

    def __init__(self, lock_path: Path, invocation: str, n: int) -> None:
        self.lock_path, self.invocation, self.n = lock_path, invocation, n
        self._lock: IO[bytes] | None = None

    def spent(self, study: Any) -> int:
        return sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get(INVOCATION_ATTR) == self.invocation)

    def take(self, study: Any) -> bool:
        """True, with the lock held, while trials of the budget are left; False (lock released) when spent."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.lock_path, "ab")  # noqa: SIM115 - held across Optuna's ask(), closed by release()
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        if self.spent(study) < self.n:
            return True
        self.release()
        return False

    def claim(self, trial: Any) -> None:
        trial.set_user_attr(INVOCATION_ATTR, self.invocation)
        trial.set_user_attr(WORKER_ATTR, worker_id())
        self.release()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def after_trial(self, study: Any, _trial: Any) -> None:
        """Optuna callback: the next ask() comes with the lock held, or the worker stops."""
        if not self.take(study):
            study.stop()


def lock_path(params: Params) -> Path:
    return Path(params.tune.trials_dir) / params.tune.study_name / LOCK_FILE


def run_worker(params_path: str, study_run_id: str, index: int, tags: dict[str, Any]) -> list[int]:
    """One worker: trials of the study until the invocation's budget is spent; returns their numbers."""
    from ml.config import load_params
    from ml.settings import load_settings

    params = load_params(params_path)
    study = open_study(params.tune)
    if index:
        study.sampler.reseed_rng()  # what Optuna does for its own parallel jobs: workers draw different trials
    return work(study, study_context(params, load_settings().tracking, study_run_id, tags))


def work(study: Any, ctx: StudyContext) -> list[int]:
    """Trials of ``study`` in this process until the invocation's budget is spent; returns their numbers."""
    params = ctx.params
    budget = Budget(lock_path(params), ctx.study_run_id, params.tune.n_trials)
    ran: list[int] = []

    def objective(trial: Any) -> float:
        budget.claim(trial)
        ran.append(trial.number)
        return run_trial(trial, ctx)

    if budget.take(study):
        try:
            study.optimize(objective, timeout=params.tune.timeout_s, callbacks=[budget.after_trial])
        finally:
            budget.release()
    return ran


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def worker_environment(workers: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The workers' environment: this one, with torch's CPU threads split among the workers
    (``OMP_NUM_THREADS``, as torchrun sets it) unless the user set them; N workers with a thread
    per core each would oversubscribe the cores."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    return env


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block (worker 0, which is this process)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class WorkerOutput:
    """What a worker process writes (stdout and stderr, one pipe), read by a thread: each line goes to
    ``to_log`` (the stage's console log, not the terminal), or to this process's stdout without one;
    the last ``keep`` lines stay for the error of a worker that fails."""

    def __init__(self, proc: subprocess.Popen, to_log: Callable[[str], None] | None, keep: int = 40) -> None:
        self.proc, self.to_log = proc, to_log
        self.tail: deque[str] = deque(maxlen=keep)
        self._thread = threading.Thread(target=self._read, name=f"tune-worker-{proc.pid}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.tail.append(line)
            if self.to_log is None:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                self.to_log(line)

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)


class WorkerPool:
    """``workers`` processes running one invocation of a study (see the module docstring). With
    ``to_log`` (the stage's :meth:`ml.tracking.console.ConsoleCapture.to_log`) the worker processes'
    output goes to the stage's console log, so the terminal shows worker 0's lines as a one-worker
    run does, a line per worker at the end, and the output of a worker that failed."""

    def __init__(self, params_path: str, workers: int, to_log: Callable[[str], None] | None = None) -> None:
        self.params_path, self.workers, self.to_log = params_path, workers, to_log

    def optimize(self, study: Any, ctx: StudyContext) -> None:
        """Starts the workers, waits for all of them, fails the trials of any that died. Raises a
        :class:`PipelineError` when a worker ended with an error (a killed one is not an error: the others went on)."""
        check_workers(self.workers, ctx.params.tune.storage)
        command = [sys.executable, "-m", "ml.tune.workers", "--params", self.params_path,
                   "--study-run", ctx.study_run_id, "--tags", json.dumps(dict(ctx.tags), default=str)]
        procs: list[subprocess.Popen] = []
        outputs: list[WorkerOutput] = []
        try:
            env = worker_environment(self.workers)
            for index in range(1, self.workers):
                procs.append(subprocess.Popen([*command, "--index", str(index)], env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True, errors="replace"))
                outputs.append(WorkerOutput(procs[-1], self.to_log))
            with torch_threads(int(env["OMP_NUM_THREADS"])):
                ran = work(study, ctx)  # worker 0: this process, its imports done, starts at once
            print(f"tune worker 0 (pid {os.getpid()}, the stage's process): trials {', '.join(map(str, ran)) or 'none'}")
            for proc in procs:
                proc.wait()
        except BaseException:  # interrupted or cancelled: stop the workers, leave no trial RUNNING
            for proc in procs:
                _stop(proc)
            _settle(study, ctx, procs)
            raise
        finally:
            for output in outputs:
                output.join()
        _settle(study, ctx, procs)
        by_worker: dict[str, list[int]] = {}
        for t in study.get_trials(deepcopy=False):  # one read of the storage for every worker's line
            if t.user_attrs.get(INVOCATION_ATTR) == ctx.study_run_id:
                by_worker.setdefault(str(t.user_attrs.get(WORKER_ATTR)), []).append(t.number)
        for index, proc in enumerate(procs, 1):
            numbers = by_worker.get(f"{socket.gethostname()}:{proc.pid}", [])
            print(f"tune worker {index} (pid {proc.pid}): trials {', '.join(map(str, numbers)) or 'none'}"
                  + ("" if proc.returncode == 0 else f", {describe_exit(proc.returncode)}"))
        failed = [(i, p, o) for i, (p, o) in enumerate(zip(procs, outputs), 1) if p.returncode > 0]
        if failed:
            i, proc, output = failed[0]
            if self.to_log is not None:  # its last lines, traceback and all, were in the log only
                sys.stderr.write(f"--- the last lines of tune worker {i} (pid {proc.pid}) ---\n{''.join(output.tail)}")
            raise PipelineError(f"tune: worker {i} of {self.workers} (pid {proc.pid}) ended with "
                                f"{describe_exit(proc.returncode)}; its error is in the output above")


def _settle(study: Any, ctx: StudyContext, procs: list[subprocess.Popen]) -> None:
    host = socket.gethostname()
    exits = {f"{host}:{proc.pid}": proc.returncode for proc in procs}
    for number, worker in fail_abandoned_trials(study, ctx, exits):
        logger.warning("tune: worker %s %s during trial %d; the trial is marked FAIL, the others went on",
                       worker, describe_exit(exits.get(worker, 0)), number)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()  # the worker's tracker drains its metrics on SIGTERM
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def fail_abandoned_trials(study: Any, ctx: StudyContext, exits: dict[str, int]) -> list[tuple[int, str]]:
    """Trials of this invocation still RUNNING once its workers have ended: each becomes FAIL in the
    study, its MLflow run KILLED (tagged with the reason) and its trial directory is removed.
    Returns (trial number, worker) pairs."""
    import optuna

    from ml.tracking.mlflow_tracker import configure_mlflow

    running = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
               if t.user_attrs.get(INVOCATION_ATTR) == ctx.study_run_id]
    client = configure_mlflow(ctx.tracking) if running else None
    abandoned = []
    for trial in running:
        worker = str(trial.user_attrs.get(WORKER_ATTR, "unknown"))
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            reason = f"worker {worker} {describe_exit(exits.get(worker, 0))} during the trial"
            client.set_tag(run_id, STATE_TAG, "FAIL")
            client.set_tag(run_id, "error", reason)
            client.set_terminated(run_id, status="KILLED")
        shutil.rmtree(trial_dir(ctx.params.tune, trial.number), ignore_errors=True)
        abandoned.append((trial.number, worker))
    return abandoned


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ml.tune.workers",
                                     description="One tuning worker (started by flows.tuning --workers N).")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--study-run", required=True, help="MLflow run id of the study run the trials nest under")
    parser.add_argument("--index", type=int, default=0, help="this worker's index among the invocation's workers")
    parser.add_argument("--tags", default="{}", help="JSON object of tags every trial run carries")
    args = parser.parse_args(argv)
    # warnings and errors only: the stage's lines of note are printed as well as logged at INFO, and
    # printed once they reach the flow's console as worker 0's do
    logging.basicConfig(level=logging.WARNING, format=f"[worker {args.index}] %(levelname)s %(name)s: %(message)s")
    ran = run_worker(args.params, args.study_run, args.index, json.loads(args.tags))
    print(f"tune worker {args.index} (pid {os.getpid()}): trials {', '.join(map(str, ran)) or 'none'}")


if __name__ == "__main__":
    main()
