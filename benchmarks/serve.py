"""Serving throughput and latency: ``mlops serve`` against ``mlflow models serve`` on one model version.

Usage: ``python -m benchmarks.serve [--tracking-uri URI --model NAME] [--alias champion]
[--clients 1,10,50] [--duration 5] [--rounds 2]``.

Without ``--tracking-uri``/``--model`` it builds a throwaway project in a temp dir (a short training
run through the stage entry points, registration, approval, promotion). Each server runs alone, one
worker process each, on loopback; ``mlflow models serve`` gets ``models:/NAME/VERSION`` of the
version the alias names, so both serve the same weights. The load generator is one asyncio process
speaking HTTP/1.1 over keep-alive connections with pre-encoded requests (one digits row per
request, the same bodies for both servers), so it costs far less per request than either server.
It still shares the machine's cores with the server under test, which the figures include.
Each round measures every server at every client count; the table keeps each cell's best round,
which damps noise from neighbours on a shared machine. The last line is
``RESULT throughput_vs_mlflow=<ours/mlflow req/s at the highest client count> p99_ms_at_<N>=<ours>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mlops import services

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "validate", "train", "evaluate", "register")


def setup_project(directory: Path) -> tuple[str, str, Path]:
    """A short training run registered, approved and promoted; returns (tracking URI, model, params)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update({"epochs": 5, "hidden_sizes": [128, 64]})
    params["register"]["min_test_accuracy"] = 0.5
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    params_path = directory / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    (directory / "settings.yaml").write_text(yaml.safe_dump({"tracking": {"uri": uri}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "GX_ANALYTICS_ENABLED": "false",
           "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
    for stage in STAGES:
        done = subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=directory, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: stage {stage} failed: {done.stderr.strip().splitlines()[-1]}")
    version = json.loads((directory / params["register"]["output"]).read_text())["version"]
    from mlflow import MlflowClient

    from registry import store

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = params["register"]["model_name"]
    store.decide(client, name, version, "Approved", "benchmark", "benchmark run", allow_self_approval=True)
    store.promote(client, name, version, "benchmark")
    return uri, name, params_path


def alias_version(uri: str, name: str, alias: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return str(client.get_model_version_by_alias(name, alias).version)


def example_rows(uri: str, name: str, version: str, count: int = 64) -> list[list[float]]:
    """Digits rows for request bodies: the model's logged input example, cycled up to ``count``."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    source = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/input_example.json", dst_path=tmp,
                                                   tracking_uri=uri)
        example = json.loads(Path(path).read_text())
    rows = example["inputs"] if isinstance(example, dict) else example
    return [rows[i % len(rows)] for i in range(count)]


def start_ours(uri: str, name: str, alias: str, params_path: Path, port: int, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "mlops.cli", "--params", str(params_path),
            "--settings", str(params_path.parent / "settings.yaml"), "--tracking-uri", uri, "serve",
            "--name", name, "--alias", alias, "--port", str(port), "--endpoint", "benchmark"]
    return services.start_server(args, f"http://127.0.0.1:{port}/health", 120, log=log, cwd=params_path.parent,
                                 env={"PYTHONPATH": str(REPO)})


def start_mlflow_serve(uri: str, name: str, version: str, port: int, log: Path) -> subprocess.Popen:
    args = [str(services.BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}/{version}", "--env-manager",
            "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    return services.start_server(args, f"http://127.0.0.1:{port}/health", 180, log=log,
                                 env={"MLFLOW_TRACKING_URI": uri,  # it execs `uvicorn` from PATH
                                      "PATH": f"{services.BIN}{os.pathsep}{os.environ.get('PATH', '')}"})


def encode_requests(path: str, port: int, rows: list[list[float]]) -> list[bytes]:
    out = []
    for row in rows:
        body = json.dumps({"inputs": [row]}).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        out.append(head + body)
    return out


async def _client(port: int, requests: list[bytes], offset: int, warm_until: float, stop_at: float,
                  latencies: list[float], failures: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                return
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = _content_length(head)
            await reader.readexactly(length)
            if start >= warm_until:
                latencies.append(time.perf_counter() - start)
                if head[9:12] != b"200":
                    failures.append(int(head[9:12]))
    finally:
        writer.close()


def _content_length(head: bytes) -> int:
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
    return int(lower[at + 17:lower.find(b"\r\n", at + 2)])


@dataclass(frozen=True)
class Cell:
    rps: float
    p50_ms: float
    p99_ms: float
    failures: int
    client_cpu: float  # share of one core used by the load generator (warm-up included)
    server_cpu: float  # share of one core used by the server's processes


def server_cpu_seconds(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in (root, *root.children(recursive=True)):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def load(port: int, pid: int, requests: list[bytes], clients: int, duration: float, warmup: float) -> Cell:
    """``clients`` keep-alive connections, each sending one request after the other."""
    latencies: list[float] = []
    failures: list[int] = []

    async def run() -> None:
        now = time.perf_counter()
        warm_until, stop_at = now + warmup, now + warmup + duration
        await asyncio.gather(*(_client(port, requests, k * 7, warm_until, stop_at, latencies, failures)
                               for k in range(clients)))

    wall, client_cpu, server_cpu = time.perf_counter(), time.process_time(), server_cpu_seconds(pid)
    asyncio.run(run())
    wall = time.perf_counter() - wall
    client_cpu, server_cpu = time.process_time() - client_cpu, server_cpu_seconds(pid) - server_cpu
    latencies.sort()
    n = len(latencies)
    return Cell(n / duration, statistics.median(latencies) * 1000, latencies[min(n - 1, int(n * 0.99))] * 1000,
                len(failures), client_cpu / wall, server_cpu / wall)


def check_same_predictions(our_port: int, mlflow_port: int, rows: list[list[float]]) -> bool:
    import urllib.request

    def post(port: int, path: str) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps({"inputs": rows}).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    ours = post(our_port, "/predict")["predictions"]
    theirs = [max(range(len(r)), key=r.__getitem__) for r in post(mlflow_port, "/invocations")["predictions"]]
    return ours == theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="an existing store or server (default: a throwaway project)")
    parser.add_argument("--model", help="registered model name (with --tracking-uri)")
    parser.add_argument("--alias", default="champion", help="alias both servers serve (default: champion)")
    parser.add_argument("--params", help="params file for mlops serve (default: the repository's)")
    parser.add_argument("--clients", default="1,10,50", help="comma-separated concurrency levels")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all cells; each cell keeps its best")
    args = parser.parse_args()
    if bool(args.tracking_uri) != bool(args.model):
        parser.error("--tracking-uri and --model go together")
    levels = [int(c) for c in args.clients.split(",")]
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        if args.tracking_uri:
            uri, name = args.tracking_uri, args.model
            params_path = work / "params.yaml"
            params = yaml.safe_load(Path(args.params or REPO / "params.yaml").read_text())
            params_path.write_text(yaml.safe_dump(params, sort_keys=False))
            (work / "settings.yaml").write_text(yaml.safe_dump({"serve": {"records_dir": str(work / "deployments")}}))
        else:
            print("setting up a project (training, registration, approval, promotion) ...", flush=True)
            uri, name, params_path = setup_project(work)
        version = alias_version(uri, name, args.alias)
        rows = example_rows(uri, name, version)
        ports = {"mlops serve": services.free_port(), "mlflow models serve": services.free_port()}
        starters = {"mlops serve": lambda p: start_ours(uri, name, args.alias, params_path, p, work / "ours.log"),
                    "mlflow models serve": lambda p: start_mlflow_serve(uri, name, version, p, work / "mlflow.log")}
        paths = {"mlops serve": "/predict", "mlflow models serve": "/invocations"}
        print(f"model {name} v{version} (@{args.alias}); {os.cpu_count()} cores shared by client and server; "
              f"{args.duration:g} s per cell, best of {args.rounds} rounds", flush=True)
        results: dict[tuple[str, int], Cell] = {}
        for _ in range(args.rounds):
            for server, port in ports.items():
                proc = starters[server](port)
                try:
                    requests = encode_requests(paths[server], port, rows)
                    for clients in levels:
                        cell = load(port, proc.pid, requests, clients, args.duration, args.warmup)
                        best = results.get((server, clients))
                        if best is None or cell.rps > best.rps:
                            results[(server, clients)] = cell
                finally:
                    services.stop(proc)
        procs = [starters[s](p) for s, p in ports.items()]
        try:
            same = check_same_predictions(ports["mlops serve"], ports["mlflow models serve"], rows)
        finally:
            for proc in procs:
                services.stop(proc)
    print(f"same predictions from both servers on {len(rows)} rows: {'yes' if same else 'NO'}")
    print(f"{'server':<22}{'clients':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}"
          f"{'client cpu':>12}{'server cpu':>12}")
    for (server, clients), cell in sorted(results.items(), key=lambda kv: (kv[0][0] != "mlops serve", kv[0][1])):
        print(f"{server:<22}{clients:>8}{cell.rps:>10.0f}{cell.p50_ms:>9.2f}{cell.p99_ms:>9.2f}{cell.failures:>8}"
              f"{cell.client_cpu:>11.0%}{cell.server_cpu:>12.0%}")
    print("cpu: share of one core over the cell; the client and the server share the machine's cores")
    top = max(levels)
    for clients in levels:
        ratio = results[("mlops serve", clients)].rps / results[("mlflow models serve", clients)].rps
        print(f"throughput ratio at {clients} clients: {ratio:.2f}x")
    ratio = results[("mlops serve", top)].rps / results[("mlflow models serve", top)].rps
    print(f"RESULT throughput_vs_mlflow={ratio:.2f} p99_ms_at_{top}={results[('mlops serve', top)].p99_ms:.1f}")


if __name__ == "__main__":
    main()
