"""Per-call cost of logging a metric: MetricBuffer.log against a synchronous MlflowClient.log_batch.

Usage: ``python -m benchmarks.tracking_calls [--calls 100000] [--batch 100] [--sync-calls 200]``.
The buffered figure is the median over batches of ``--batch`` calls, in ns per call. The
synchronous figure logs one metric per ``log_batch`` into a throwaway SQLite store, which is what
``MlflowTracker.log_metrics`` costs the training thread today (a remote server adds the network).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def buffered_ns_per_call(calls: int, batch: int, spool_dir: Path) -> tuple[float, float]:
    from ml.tracking.buffer import MetricBuffer

    buffer = MetricBuffer(lambda chunk: None, spool_dir / "spool.jsonl", register_atexit=False)
    per_call = []
    step = 0
    for _ in range(calls // batch):
        start = time.perf_counter_ns()
        for _ in range(batch):
            buffer.log("loss", 0.5, step)
            step += 1
        per_call.append((time.perf_counter_ns() - start) / batch)
    buffer.close()
    per_call.sort()
    return statistics.median(per_call), per_call[int(len(per_call) * 0.99)]


def synchronous_ns_per_call(calls: int, store_dir: Path) -> float:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=f"sqlite:///{store_dir / 'bench.db'}")
    run_id = client.create_run(client.create_experiment("bench")).info.run_id
    per_call = []
    for step in range(calls):
        start = time.perf_counter_ns()
        client.log_batch(run_id, metrics=[Metric("loss", 0.5, int(time.time() * 1000), step)])
        per_call.append(time.perf_counter_ns() - start)
    return statistics.median(per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--sync-calls", type=int, default=200, help="0 skips the synchronous baseline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        median, p99 = buffered_ns_per_call(args.calls, args.batch, Path(tmp))
        print(f"MetricBuffer.log: median {median / 1000:.2f} us/call, p99 {p99 / 1000:.2f} us/call "
              f"({args.calls} calls, batches of {args.batch})")
        if args.sync_calls:
            sync = synchronous_ns_per_call(args.sync_calls, Path(tmp))
            print(f"MlflowClient.log_batch (sqlite, 1 metric): median {sync / 1000:.1f} us/call "
                  f"({args.sync_calls} calls)")


if __name__ == "__main__":
    main()
