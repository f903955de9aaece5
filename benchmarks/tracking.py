"""Tracking cost in the training thread, and what lands, against one SQLite-backed mlflow server.

    python -m benchmarks.tracking [--calls 20000] [--sync-calls 300] [--async-calls 3000] [--steps 400]

1. Per-call cost of logging one metric, in the training thread: ours (``MlflowTracker.log_metric``,
   a deque append drained by a background thread), ``mlflow.log_metric(synchronous=True)`` and
   ``mlflow.log_metric(synchronous=False)``; then, after each has flushed, how many of the points it
   was given are in the store, with the right values and steps.
2. Loop overhead: the same training loop (``ml.train.loop.fit`` on synthetic data) bare, and with full
   tracking (4 metrics every step, system metrics every second, weight/gradient histograms every 50
   steps) plus an asynchronous training checkpoint every 100 steps. Rounds alternate bare/tracked
   and the medians are compared.

The last line reads ``RESULT ours_vs_mlflow_async=<a> landed_vs_sent=<b> loop_overhead=<c>``: a is
our median per-call cost over mlflow's asynchronous one, b the fraction of our points that landed,
c the tracked loop's extra wall time over the bare loop's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _median_us(samples_ns: list[int]) -> float:
    return statistics.median(samples_ns) / 1000


def landed(client, run_id: str, key: str, expected: dict[int, float]) -> int:
    """Points of ``key`` in the store whose step and value match what was logged."""
    history = client.get_metric_history(run_id, key)
    found = {m.step: m.value for m in history}
    return sum(1 for step, value in expected.items() if step in found and found[step] == value)


def bench_ours(cfg, client, calls: int) -> tuple[float, float, int]:
    from ml.tracking.mlflow_tracker import MlflowTracker

    tracker = MlflowTracker.start(cfg, "bench-ours", system_metrics=False)
    log = tracker.log_metric
    per_call, expected = [], {}
    batch = 100
    for start_step in range(0, calls, batch):
        t0 = time.perf_counter_ns()
        for step in range(start_step, start_step + batch):
            log("loss", step * 0.5, step)
        per_call.append((time.perf_counter_ns() - t0) // batch)
    for step in range(calls):
        expected[step] = step * 0.5
    tracker.close()
    return _median_us(per_call), statistics.quantiles(per_call, n=100)[98] / 1000, landed(
        client, tracker.run_id, "loss", expected)


def bench_mlflow(cfg, client, calls: int, synchronous: bool) -> tuple[float, float, int]:
    import mlflow

    mlflow.set_tracking_uri(cfg.uri)
    mlflow.set_experiment(cfg.experiment)
    per_call, expected = [], {}
    with mlflow.start_run(run_name=f"bench-mlflow-{'sync' if synchronous else 'async'}") as run:
        for step in range(calls):
            t0 = time.perf_counter_ns()
            mlflow.log_metric("loss", step * 0.5, step=step, synchronous=synchronous)
            per_call.append(time.perf_counter_ns() - t0)
            expected[step] = step * 0.5
        if not synchronous:
            mlflow.flush_async_logging()
    return _median_us(per_call), statistics.quantiles(per_call, n=100)[98] / 1000, landed(
        client, run.info.run_id, "loss", expected)


def make_loop(width: int, n: int, seed: int = 0):
    import torch
    from torch import nn

    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n, 256), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 10, n).astype(np.int64))

    def build():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                              nn.Linear(width, 10))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    return build, (x, y), (x[:256], y[:256])


def timed_fit(build, train, val, steps: int, batch: int, tracker=None, hooks_for=None) -> float:
    import torch

    from ml.train.loop import fit

    model, optimizer = build()
    generator = torch.Generator().manual_seed(0)
    hooks = hooks_for(model, optimizer, generator) if hooks_for else []
    epochs = max(1, steps * batch // len(train[0]))
    t0 = time.perf_counter()
    fit(model, optimizer, train, val, epochs=epochs, batch_size=batch, generator=generator, tracker=tracker,
        hooks=[h for h in hooks if hasattr(h, "on_step_end")])
    elapsed = time.perf_counter() - t0
    for hook in hooks:
        if hasattr(hook, "close"):
            hook.close()
    return elapsed


def bench_loop(cfg, work: Path, steps: int, rounds: int, width: int, batch: int) -> tuple[float, float, dict]:
    from ml.checkpoint.manager import CheckpointManager
    from ml.train.checkpoints import CheckpointHook
    from ml.observe.histograms import HistogramHook
    from ml.tracking.mlflow_tracker import MlflowTracker

    build, train, val = make_loop(width, steps * batch // 4)
    bare, tracked = [], []
    detail: dict = {}
    timed_fit(build, train, val, min(steps, 50), batch)  # warm-up: allocator, kernels
    for r in range(rounds):
        bare.append(timed_fit(build, train, val, steps, batch))
        tracker = MlflowTracker.start(cfg, f"bench-loop-{r}", system_metrics=True)
        root = work / f"ckpt-{r}"

        def hooks_for(model, optimizer, generator, tracker=tracker, root=root, r=r):
            manager = CheckpointManager(root, keep_last=2)
            hist = HistogramHook(model, work / f"tb-{r}", every_steps=50)
            ckpt = CheckpointHook(manager, model, optimizer, generator=generator, every_steps=100,
                                  at_epoch_end=False)
            return [hist, ckpt, manager]

        tracked.append(timed_fit(build, train, val, steps, batch, tracker=tracker, hooks_for=hooks_for))
        counters = tracker.close()
        detail = {"sent": counters.sent, "spooled": counters.spooled}
    return statistics.median(bare), statistics.median(tracked), detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="our log calls")
    parser.add_argument("--sync-calls", type=int, default=300, help="mlflow.log_metric(synchronous=True) calls")
    parser.add_argument("--async-calls", type=int, default=3_000, help="mlflow.log_metric(synchronous=False) calls")
    parser.add_argument("--steps", type=int, default=400, help="training steps per loop run")
    parser.add_argument("--rounds", type=int, default=3, help="bare/tracked loop pairs")
    parser.add_argument("--width", type=int, default=1024, help="hidden width of the benchmark MLP")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    from mlops.services import free_port, start_mlflow, stop
    from ml.settings import TrackingConfig

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        port = free_port()
        server = start_mlflow(f"sqlite:///{work / 'mlflow.db'}", work / "artifacts", port, log=work / "mlflow.log")
        try:
            uri = f"http://127.0.0.1:{port}"
            cfg = TrackingConfig(uri=uri, experiment="bench-tracking", artifact_root=str(work / "artifacts"),
                                 flush_interval_s=1.0, spool_dir=str(work / "spool"), system_metrics_interval_s=1.0,
                                 histogram_every_steps=50, confusion_every_epoch=False, progress="off")
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            if client.get_experiment_by_name(cfg.experiment) is None:
                client.create_experiment(cfg.experiment)
            rows = []
            ours = bench_ours(cfg, client, args.calls)
            rows.append(("ours (MlflowTracker.log_metric)", args.calls, *ours))
            sync = bench_mlflow(cfg, client, args.sync_calls, synchronous=True)
            rows.append(("mlflow.log_metric(synchronous=True)", args.sync_calls, *sync))
            async_ = bench_mlflow(cfg, client, args.async_calls, synchronous=False)
            rows.append(("mlflow.log_metric(synchronous=False)", args.async_calls, *async_))
            print(f"{'logging path':40} {'calls':>7} {'median us':>11} {'p99 us':>10} {'landed':>8} {'landed/sent':>12}")
            for name, calls, median, p99, got in rows:
                print(f"{name:40} {calls:7d} {median:11.2f} {p99:10.2f} {got:8d} {got / calls:12.4f}")
            bare, tracked, detail = bench_loop(cfg, work, args.steps, args.rounds, args.width, args.batch)
            overhead = (tracked - bare) / bare
            print(f"\nloop of {args.steps} steps (MLP 256-{args.width}-{args.width}-10, batch {args.batch}), "
                  f"median of {args.rounds} rounds:")
            print(f"  bare    {bare:8.3f} s  ({1000 * bare / args.steps:.2f} ms/step)")
            print(f"  tracked {tracked:8.3f} s  ({1000 * tracked / args.steps:.2f} ms/step): 4 metrics/step, "
                  f"system metrics every 1 s, histograms every 50 steps, checkpoint every 100 steps; "
                  f"last round sent {detail['sent']} points, spooled {detail['spooled']}")
            print(f"  overhead {100 * overhead:+.2f} %   (cpu count {os.cpu_count()})")
            a = ours[0] / async_[0]
            b = ours[2] / args.calls
            print(f"RESULT ours_vs_mlflow_async={a:.4f} landed_vs_sent={b:.4f} loop_overhead={overhead:.4f}")
        finally:
            stop(server)


if __name__ == "__main__":
    main()
