"""Scale-out: one tuning study with 1 and 2 worker processes on PostgreSQL, and ``log_batch``
throughput of an ``mlflow server`` on PostgreSQL against one on SQLite.

    python -m benchmarks.scale [--trials 16] [--epochs 30] [--metrics 10000] [--rounds 3]

Everything runs on loopback in a temporary directory: a PostgreSQL cluster from the machine's
binaries (:class:`mlops.postgres.PostgresCluster`, fsync on as a real server has it) and
``mlflow server`` on it (:func:`mlops.services.start_mlflow`), then a second server on SQLite.

1. Tuning: digits is prepared once; then the tune stage (``tasks.tune.run``) runs the same study,
   ``--trials`` trials of ``--epochs`` epochs of a small MLP with a fixed batch size, so every trial
   costs the same (30 epochs: about 1.4 s here, 100: 4.4 s; at 4, a 0.6 s trial is mostly its MLflow logging
   and the workers' start-up), no pruning, the study in its own PostgreSQL database and the trials logged to the
   PostgreSQL-backed server: once with ``--workers 1``, once with two workers (the stage's process and
   one worker process), each in a new process so that neither finds imports and warm-ups the other paid
   for. The wall time is the whole stage, worker start-up and the study run's plots included; the median
   trial duration (Optuna's start to complete) shows how much of a difference is per-trial cost.
2. ``log_batch``: ``--metrics`` points to a new run, 1,000 per call (MLflow's limit per request),
   to each server, ``--rounds`` times alternating; the median throughput of each is compared.

The last line reads ``RESULT tune_2workers_vs_1=<wall with 2 / with 1> pg_vs_sqlite_log_batch=<PostgreSQL
points/s / SQLite points/s>``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BATCH = 1000  # MLflow's limit of metrics per log_batch request


def tuning_params(trials: int, epochs: int) -> dict[str, Any]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["contract"]["path"] = str(REPO / params["contract"]["path"])
    params["train"].update({"epochs": epochs, "hidden_sizes": [64], "batch_size": 64})
    params["tune"].update({"n_trials": trials, "pruner": "none", "timeout_s": None,
                           "space": {"lr": {"low": 0.001, "high": 0.03, "log": True},
                                     "weight_decay": {"low": 1e-6, "high": 1e-3, "log": True},
                                     "dropout": {"low": 0.0, "high": 0.3}}})
    return params


# One configuration of the study in a process of its own, so that neither finds the imports and
# warm-ups (torch, MLflow's model flavors, Optuna's plots) the other's trials paid for.
STAGE = """
import json, sys, time
from tasks.tune import run
start = time.perf_counter()
summary = run("params.yaml", workers=int(sys.argv[1]))
print("SCALE-BENCH " + json.dumps({"wall_s": time.perf_counter() - start, "summary": summary}, default=str))
"""


def run_stage(project: Path, workers: int) -> tuple[float, dict[str, Any]]:
    """The tune stage's wall time (from its call, in a new process) and its summary."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", STAGE, str(workers)], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    line = next((x for x in done.stdout.splitlines() if x.startswith("SCALE-BENCH ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"tune stage with {workers} workers: exit code {done.returncode}\n{done.stderr[-3000:]}")
    result = json.loads(line.removeprefix("SCALE-BENCH "))
    return result["wall_s"], result["summary"]


def bench_tuning(project: Path, cluster: Any, tracking_uri: str, trials: int, epochs: int) -> dict[int, dict]:
    """Wall time and trial states of the tune stage with 1 and with 2 workers, each on a new study."""
    import optuna

    from tasks.prepare import run as prepare

    params = tuning_params(trials, epochs)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ["MLOPS_TRACKING__URI"] = tracking_uri
    os.environ["MLOPS_TRACKING__PROGRESS"] = "off"
    cwd = Path.cwd()
    os.chdir(project)
    try:
        prepare("params.yaml")
        results = {}
        for workers in (1, 2):
            params["tune"].update({"storage": cluster.create_database(f"optuna_w{workers}"),
                                   "study_name": f"scale-w{workers}"})
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            wall, summary = run_stage(project, workers)
            study = optuna.load_study(study_name=params["tune"]["study_name"], storage=params["tune"]["storage"])
            durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials]
            results[workers] = {"wall_s": wall, "states": summary["trial_states"], "best": summary["best_value"],
                                "trial_s": statistics.median(durations)}
        return results
    finally:
        os.chdir(cwd)


def log_batch_rate(uri: str, n: int) -> float:
    """Points per second of ``n`` metrics sent with ``log_batch`` to a new run on ``uri``."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("bench-scale")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("bench-scale")
    run_id = client.create_run(experiment_id).info.run_id
    now = int(time.time() * 1000)
    points = [Metric(f"m{i % 10}", float(i), now, i // 10) for i in range(n)]
    start = time.perf_counter()
    for i in range(0, n, BATCH):
        client.log_batch(run_id, metrics=points[i:i + BATCH])
    elapsed = time.perf_counter() - start
    client.set_terminated(run_id)
    landed = sum(len(client.get_metric_history(run_id, f"m{k}")) for k in range(10))
    if landed != n:
        raise RuntimeError(f"log_batch to {uri}: {landed} of {n} points landed")
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="trials of the tuning study")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of each trial")
    parser.add_argument("--metrics", type=int, default=10_000, help="points per log_batch measurement")
    parser.add_argument("--rounds", type=int, default=3, help="log_batch measurements per server, alternating")
    args = parser.parse_args()

    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    from mlops.postgres import PostgresCluster, pg_bin_dir
    from mlops.services import free_port, start_mlflow, stop, upgrade_database

    bin_dir = pg_bin_dir()
    if bin_dir is None:
        raise SystemExit("error: PostgreSQL binaries (initdb, pg_ctl) are not on this machine")
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    # a directory of its own: under root the cluster runs as another user, who must reach it
    cluster = PostgresCluster(bin_dir, Path(tempfile.mkdtemp(prefix="bench-scale-pg-")), fsync=True)
    servers = []
    try:
        cluster.start()
        pg_store = cluster.create_database("mlflow")
        upgrade_database(pg_store)
        pg_port, sqlite_port = free_port(), free_port()
        servers.append(start_mlflow(pg_store, work / "artifacts-pg", pg_port, log=work / "mlflow-pg.log"))
        servers.append(start_mlflow(f"sqlite:///{work / 'mlflow.db'}", work / "artifacts-sqlite", sqlite_port,
                                    log=work / "mlflow-sqlite.log"))
        pg_uri, sqlite_uri = f"http://127.0.0.1:{pg_port}", f"http://127.0.0.1:{sqlite_port}"

        rates: dict[str, list[float]] = {"postgresql": [], "sqlite": []}
        for _ in range(args.rounds):
            rates["postgresql"].append(log_batch_rate(pg_uri, args.metrics))
            rates["sqlite"].append(log_batch_rate(sqlite_uri, args.metrics))
        project = work / "project"
        project.mkdir()
        tuning = bench_tuning(project, cluster, pg_uri, args.trials, args.epochs)
    finally:
        for server in servers:
            stop(server)
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ntuning: {args.trials} trials x {args.epochs} epochs (MLP 64, batch 64), study on PostgreSQL, "
          f"trials logged to mlflow server on PostgreSQL; {os.cpu_count()} CPUs")
    print(f"{'workers':>8} {'wall s':>9} {'trials/min':>11} {'median trial s':>15} {'best val_accuracy':>18}  states")
    for workers, row in tuning.items():
        per_min = 60 * sum(row["states"].values()) / row["wall_s"]
        print(f"{workers:8d} {row['wall_s']:9.1f} {per_min:11.1f} {row['trial_s']:15.2f} {row['best']:18.4f}  "
              f"{row['states']}")
    print("(each in a new process; 1 worker: trials in the stage's process, torch on every core; 2 workers: the "
          "stage's process and a worker process, the cores split between them (OMP_NUM_THREADS); the wall includes "
          "the worker's start-up and the study run's plots)")
    print(f"\nlog_batch: {args.metrics} points per run, {BATCH} per call, {args.rounds} rounds")
    print(f"{'store':>12} {'median points/s':>16}  rounds")
    medians = {store: statistics.median(values) for store, values in rates.items()}
    for store, values in rates.items():
        print(f"{store:>12} {medians[store]:16.0f}  {', '.join(f'{v:.0f}' for v in values)}")
    ratio_tune = tuning[2]["wall_s"] / tuning[1]["wall_s"]
    ratio_log = medians["postgresql"] / medians["sqlite"]
    print(f"RESULT tune_2workers_vs_1={ratio_tune:.3f} pg_vs_sqlite_log_batch={ratio_log:.3f}")


if __name__ == "__main__":
    main()
