"""Tuning in worker processes against one Optuna study on PostgreSQL (tests/integration/pg_s3.py):
the budget of an invocation is exact and trial numbers unique under contention; two workers run a
tiny study whose trials nest in the study run and prune across workers; a worker killed mid-trial
leaves a FAIL trial and a KILLED run while the other finishes, and a rerun resumes the study.
The bad inputs are one line before any work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from ml.errors import ConfigError
from ml.tune.workers import (INVOCATION_ATTR, WORKER_ATTR, WorkerOutput, check_workers, is_in_memory,
                              worker_environment)
from tests.conftest import REPO, run_module, small_params, write_params
from tests.integration.pg_s3 import postgres  # noqa: F401 (fixture)

STUDY = "parallel"
ABSURD_LR = 1e-6
# Enqueued before the first invocation: three sensible trials, then one whose learning rate cannot
# move the weights. Worker 0 (the stage's process) starts its trial 0 only once the worker process,
# which starts seconds later, has trained an epoch of trial 1, so neither of the two is judged before
# two trials have ended; trial 3 is created only once two trials have ended, so the median pruner
# (startup 2, no warm-up) compares its first epoch with trials of both workers.
TRIALS = [{"lr": 0.03, "batch_size": 64}, {"lr": 0.01, "batch_size": 128}, {"lr": 0.02, "batch_size": 64},
          {"lr": ABSURD_LR, "batch_size": 64}]


# ---- bad input ----

@pytest.mark.parametrize("storage, in_memory", [(None, True), ("sqlite://", True), ("sqlite:///:memory:", True),
                                                ("sqlite:///optuna.db", False), ("postgresql://u@db/optuna", False)])
def test_in_memory_storages(storage, in_memory):
    assert is_in_memory(storage) is in_memory


def test_workers_need_a_positive_count_and_a_storage_processes_share():
    check_workers(1, None)
    check_workers(3, "postgresql://u:secret@db/optuna")
    with pytest.raises(ConfigError, match=r"^--workers: expected a number of worker processes >= 1, got 0$"):
        check_workers(0, "sqlite:///optuna.db")
    with pytest.raises(ConfigError, match=r"^--workers 2: tune.storage sqlite:// is in memory, which worker "
                                          r"processes cannot share; expected a file"):
        check_workers(2, "sqlite://")
    with pytest.raises(ConfigError, match=r"tune.storage None is in memory"):
        check_workers(2, None)


def test_workers_split_the_cores_unless_the_user_set_the_threads():
    cores = os.cpu_count() or 1
    assert worker_environment(2, {"PATH": "/bin"}) == {"PATH": "/bin", "OMP_NUM_THREADS": str(max(1, cores // 2))}
    assert worker_environment(4 * cores, {})["OMP_NUM_THREADS"] == "1"
    assert worker_environment(2, {"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"


def test_a_worker_processs_output_goes_to_the_stage_log_and_its_last_lines_are_kept():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; print('one', flush=True); print('two', file=sys.stderr); "
                             "sys.exit(3)"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logged: list[str] = []
    output = WorkerOutput(proc, logged.append, keep=1)
    assert proc.wait(30) == 3
    output.join()
    assert logged == ["one\n", "two\n"] and list(output.tail) == ["two\n"]


@pytest.mark.slow
@pytest.mark.parametrize("workers, storage, expected", [
    ("0", "sqlite:///optuna.db", "error: --workers: expected a number of worker processes >= 1, got 0"),
    ("2", "sqlite:///:memory:", "error: --workers 2: tune.storage sqlite:///:memory: is in memory, which worker "
                                "processes cannot share; expected a file (sqlite:///optuna.db) or a database server "
                                "(postgresql://host/db)")])
def test_the_flow_refuses_bad_worker_counts_in_one_line(tmp_path, workers, storage, expected):
    write_params(tmp_path, small_params(tune={"storage": storage}))
    done = run_module("flows.tuning", "--workers", workers, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and done.stderr.splitlines() == [expected], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing started, nothing written


# ---- the budget and trial numbers under contention (no training: an objective that returns at once) ----

BUDGET_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import optuna
    from ml.tune.workers import Budget

    storage, lock, invocation, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="budget", storage=storage)
    budget = Budget(lock, invocation, n)

    def objective(trial):
        budget.claim(trial)
        time.sleep(0.01)  # a trial that takes a moment, so the workers' asks interleave
        return trial.suggest_float("x", 0, 1)

    if budget.take(study):
        try:
            study.optimize(objective, callbacks=[budget.after_trial])
        finally:
            budget.release()
""")


@pytest.mark.slow
def test_the_budget_is_exact_and_no_trial_number_is_taken_twice(postgres, tmp_path):  # noqa: F811
    """Four processes share two invocations' budgets (16 and 10 trials) of one study at once."""
    storage = postgres.create_database("budget")
    optuna.create_study(study_name="budget", storage=storage)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", BUDGET_WORKER, storage, str(tmp_path / lock), invocation, n],
                              env=env, stderr=subprocess.PIPE, text=True)
             for lock, invocation, n in (("a.lock", "run-a", "16"), ("a.lock", "run-a", "16"),
                                         ("b.lock", "run-b", "10"), ("b.lock", "run-b", "10"))]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    trials = optuna.load_study(study_name="budget", storage=storage).trials
    assert sorted(t.number for t in trials) == list(range(26))
    by_invocation = {}
    for trial in trials:
        by_invocation.setdefault(trial.user_attrs[INVOCATION_ATTR], []).append(trial)
    assert {k: len(v) for k, v in by_invocation.items()} == {"run-a": 16, "run-b": 10}
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    workers_a = {t.user_attrs[WORKER_ATTR] for t in by_invocation["run-a"]}
    assert len(workers_a) <= 2 and all(w.rsplit(":", 1)[1].isdigit() for w in workers_a)


# ---- two workers run a tiny study ----

def tiny_params(storage: str, n_trials: int = 4) -> dict:
    params = small_params()
    params["train"].update({"epochs": 2, "hidden_sizes": [16]})
    params["tune"].update({"n_trials": n_trials, "pruner_startup_trials": 2, "pruner_warmup_epochs": 0,
                           "study_name": STUDY, "storage": storage,
                           "space": {"lr": {"low": ABSURD_LR, "high": 0.03, "log": True},
                                     "batch_size": {"choices": [64, 128]}}})
    return params


@pytest.fixture(scope="module")
def project(postgres, tmp_path_factory):  # noqa: F811
    """Processed data in a project directory whose study lives in its own PostgreSQL database."""
    from tasks.prepare import run as prepare

    project = tmp_path_factory.mktemp("tuning-workers")
    storage = postgres.create_database("optuna")
    write_params(project, tiny_params(storage))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        prepare("params.yaml")
    return project, storage


def client_of(project: Path) -> MlflowClient:
    uri = f"sqlite:///{project}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def load(storage: str) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=storage)


def worker_pid(trial: optuna.trial.FrozenTrial) -> int | None:
    worker = trial.user_attrs.get(WORKER_ATTR)
    return int(worker.rsplit(":", 1)[1]) if worker else None


def held_until(ready: Callable[[], bool], patch: pytest.MonkeyPatch) -> None:
    """Worker 0 (this process) starts each trial only once ``ready()`` (or after 240 s), so that the
    worker process, which starts seconds later, gets trials too."""
    import ml.tune.workers

    run_trial = ml.tune.workers.run_trial

    def run_when_ready(trial, ctx):
        deadline = time.monotonic() + 240
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        return run_trial(trial, ctx)

    patch.setattr(ml.tune.workers, "run_trial", run_when_ready)


@pytest.fixture(scope="module")
def two_workers(project):
    """The tune stage with two workers over the four enqueued trials."""
    from tasks.tune import run

    directory, storage = project
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
    for trial in TRIALS:
        study.enqueue_trial(trial)

    def the_other_worker_has_trained_an_epoch() -> bool:
        return any(worker_pid(t) not in (None, os.getpid()) and t.intermediate_values
                   for t in study.get_trials(deepcopy=False))

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        held_until(the_other_worker_has_trained_an_epoch, patch)
        return run("params.yaml", workers=2)


@pytest.mark.slow
def test_two_workers_run_the_study_each_trial_a_run_nested_in_the_study_run(project, two_workers):
    directory, storage = project
    summary = two_workers
    trials = load(storage).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]  # the enqueued trials, none added
    assert [t.params["lr"] for t in trials] == [t["lr"] for t in TRIALS]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert sorted(trials[3].intermediate_values) == [1]  # pruned after its first epoch
    study_run_id = summary["study_run_id"]
    assert {t.user_attrs[INVOCATION_ATTR] for t in trials} == {study_run_id}
    pids = {t.user_attrs[WORKER_ATTR].rsplit(":", 1)[1] for t in trials}
    assert str(os.getpid()) in pids and len(pids) <= 2  # worker 0 is the stage's process: it took trial 0
    client = client_of(directory)
    study_run = client.get_run(study_run_id)
    assert study_run.data.tags["tune_workers"] == "2" and study_run.data.metrics["trials_complete"] == 3
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == study_run_id and run.info.status == "FINISHED"
        assert run.data.tags["optuna_trial"] == str(trial.number) and run.data.tags["optuna_state"] == trial.state.name
        assert run.data.tags["dataset_md5"] == study_run.data.tags["dataset_md5"]
    best = load(storage).best_trial
    assert summary["best_trial"] == best.number and summary["run_id"] == best.user_attrs["mlflow_run_id"]
    weights = directory / "models" / "trials" / STUDY / f"trial-{best.number:04d}" / "model" / "model.safetensors"
    assert (directory / "models" / "model" / "model.safetensors").read_bytes() == weights.read_bytes()


@pytest.mark.slow
def test_a_killed_worker_fails_its_trial_the_other_finishes_and_a_rerun_resumes(project, two_workers):
    """SIGKILL the worker process (worker 1; worker 0 is the stage's process) once its trial's run
    exists, before its first epoch ends; a rerun adds a trial."""
    from tasks.tune import run

    directory, storage = project
    params = yaml.safe_load((directory / "params.yaml").read_text())
    params["tune"]["pruner"] = "none"
    write_params(directory, params)
    killed: list[tuple[int, int]] = []

    def kill_one_worker_mid_trial() -> None:
        study, deadline = load(storage), time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                pid = worker_pid(trial)
                if (trial.number > 3 and pid not in (None, os.getpid()) and "mlflow_run_id" in trial.user_attrs
                        and trial.intermediate_values == {}):
                    os.kill(pid, signal.SIGKILL)
                    killed.append((trial.number, pid))
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker_mid_trial, daemon=True)
    killer.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        held_until(lambda: bool(killed) or not killer.is_alive(), patch)
        summary = run("params.yaml", workers=2)
    killer.join(timeout=10)
    assert killed, "no worker was caught mid-trial"
    number, pid = killed[0]
    trials = load(storage).trials
    mine = [t for t in trials if t.user_attrs.get(INVOCATION_ATTR) == summary["study_run_id"]]
    assert [t.number for t in mine] == summary["new_trials"] == [4, 5, 6, 7]  # the budget, the killed trial counted
    by_number = {t.number: t for t in trials}
    assert by_number[number].state == optuna.trial.TrialState.FAIL
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in mine if t.number != number)
    client = client_of(directory)
    dead = client.get_run(by_number[number].user_attrs["mlflow_run_id"])
    assert dead.info.status == "KILLED" and dead.data.tags["optuna_state"] == "FAIL"
    assert dead.data.tags["error"].endswith(f":{pid} killed by SIGKILL during the trial")
    experiment = dead.info.experiment_id
    assert client.search_logged_models([experiment], filter_string=f"source_run_id = '{dead.info.run_id}'") == []
    assert not (directory / "models" / "trials" / STUDY / f"trial-{number:04d}").exists()
    assert summary["best_run_id"] != dead.info.run_id
    assert summary["trial_states"] == {"COMPLETE": 6, "PRUNED": 1, "FAIL": 1}

    params["tune"]["n_trials"] = 1
    write_params(directory, params)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        again = run("params.yaml")  # one process this time: the same study goes on
    assert again["new_trials"] == [8] and sum(again["trial_states"].values()) == 9
    (trial,) = load(storage).trials[8:]
    run_ = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run_.data.tags["mlflow.parentRunId"] == again["study_run_id"] and run_.info.status == "FINISHED"
