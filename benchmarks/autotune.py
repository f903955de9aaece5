"""Autotune against every setup picked by hand: three jobs (the default mlp on digits with the
repository's params; the cnn and the vit of :mod:`benchmarks.training`, on synthetic batches, at a
short and a long job length), each run with every candidate setup of :mod:`ml.train.autotune` and
with ``train.optimize: auto``, in one run.

Usage: ``python -m benchmarks.autotune [--batch 64] [--short 300] [--long 5000] [--rounds 3]
[--steps 3] [--device auto|cpu|cuda] [--processed DIR]``. ``--processed`` reads the digits job's training
split from a prepared directory (``data/processed`` after ``dvc repro prepare``) instead of preparing
digits into a temporary one.

A hand-picked setup's job time is measured the way the train stage runs it: the up-front compile
(:func:`ml.train.compile.compile_forward`, timed), three warmup steps (timed: first-step costs are
part of a job), then the job's remaining steps at the setup's steady step time, which is the median
of ``--rounds`` rounds of ``--steps`` steps, every setup of a model stepping in turn within a round
(so a change in the machine's load touches them alike). The jobs are longer than a benchmark can
run for every setup, so their steady part is that median times the steps.

``auto``'s time is its probe, measured for real (:func:`ml.train.autotune.tune` on the job's
model, data and length, no cache), plus the job time of the setup it chose: training after the
decision is that setup, bit for bit (tests/unit/test_autotune.py). Auto probes before the hand
setups are built, so its compiles start from a cold inductor cache and theirs may find it warm.
Each job starts with an untimed fp32 and bf16 step on a throwaway model: torch's lazy
initialization, which any first step pays, is counted for neither side.

``dataloader_vs_memory`` trains the cnn in the setup auto chose for its long job, fed by the
memory batch source (:class:`ml.train.batches.MemoryBatches`) and by the dataloader
(:class:`ml.train.batches.ParquetBatches`, 2 workers) over the same rows written to a Parquet file
in :data:`LOADER_GROUPS` row groups of about 4 MB decoded each (:data:`ROW_GROUP_BYTES`: a streamed
file's groups are sized in bytes, so a worker holds two of them, not the split), in interleaved
rounds. The last line is::

    RESULT auto_vs_best=<min over jobs of best hand-picked job time / auto's job time, probe
    included> auto_overhead=<max over jobs of auto's probe time / auto's job time>
    dataloader_vs_memory=<steps/s through the dataloader with 2 workers / through memory, cnn>
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.training import MODELS
from ml.model.architectures import Classifier, ModelSpec, build_model, set_channels_last
from ml.train.autotune import Candidate, Decision, candidates, tune
from ml.train.compile import compile_forward, example_batches
from ml.train.loop import resolve_device
from ml.train.speed import autocast_for, fast_bf16, grad_scaler_for
from ml.train.step import train_step

WARMUP = 3
ROW_GROUP_BYTES = 16 * 2**20  # decoded bytes of one row group of the dataloader comparison's Parquet file
LOADER_GROUPS = 8             # row groups in that file


@dataclass
class Job:
    """A model and its data, trained for one or more job lengths (optimizer steps)."""

    name: str
    spec: ModelSpec
    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    lr: float
    lengths: dict[str, int]
    stats: np.ndarray | None = None

    def model(self, device: torch.device) -> Classifier:
        torch.manual_seed(0)
        model = build_model(self.spec)
        if self.stats is not None:
            model.set_input_stats(self.stats)
        return model.to(device)

    def optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.lr)


@dataclass
class Hand:
    """One setup of a job, built and compiled once, then stepped in rounds."""

    candidate: Candidate
    compile_s: float
    warmup_s: float
    step: object
    round_s: list[float] = field(default_factory=list)

    def job_s(self, steps: int) -> float:
        return self.compile_s + self.warmup_s + max(steps - WARMUP, 0) * statistics.median(self.round_s)


def digits_job(device: torch.device, processed: Path | None = None) -> Job:
    """The default mlp on digits with the repository's params (its whole job: every epoch's steps),
    on the training split in ``processed``, or prepared from params.yaml's source into a temporary
    directory."""
    from ml.config import load_params
    from ml.data.prepare import load_split
    from ml.train.schedule import optimizer_steps

    repo = Path(__file__).resolve().parents[1]
    params = load_params(repo / "params.yaml")
    cfg = params.train
    if processed is not None:
        x, y = load_split(processed, "train")
    else:
        from ml.data.contract import load_contract
        from ml.data.prepare import prepare

        with tempfile.TemporaryDirectory(prefix="bench-autotune-") as tmp:
            data = params.data.model_copy(update={k: f"{tmp}/{k}" for k in ("raw_dir", "processed_dir")})
            prepare(data, load_contract(repo / params.contract.path))
            x, y = load_split(data.processed_dir, "train")
    spec = ModelSpec(x.shape[1], cfg.hidden_sizes, 10, cfg.dropout)
    steps = optimizer_steps(len(y), cfg.batch_size, cfg.accumulate_steps, cfg.epochs)
    return Job("mlp digits", spec, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), cfg.batch_size,
               cfg.lr, {"": steps}, stats=x)


def synthetic_job(name: str, device: torch.device, batch: int, short: int, long: int) -> Job:
    spec = MODELS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4 * batch, spec.in_features, generator=g)
    y = torch.randint(0, spec.num_classes, (4 * batch,), generator=g)
    return Job(name, spec, x.to(device), y.to(device), batch, 1e-3, {"short": short, "long": long})


def build_hand(job: Job, c: Candidate, device: torch.device, batches: list) -> Hand:
    model = job.model(device)
    if c.memory_format == "channels_last":
        set_channels_last(model)
    optimizer = job.optimizer(model.parameters())
    autocast, scaler = autocast_for(c.precision, device), grad_scaler_for(c.precision, device)
    compiled = compile_forward(model, c.compile, example_batches(job.x, job.y, job.batch_size), autocast)
    if compiled.fallback_reason:
        print(f"{job.name} {c.name}: compile failed, eager: {compiled.fallback_reason}", flush=True)
    counter = iter(range(10**9))

    def step() -> torch.Tensor:
        return train_step(compiled.forward, optimizer, [batches[next(counter) % len(batches)]], autocast=autocast,
                          scaler=scaler).loss

    start = time.perf_counter()
    for _ in range(WARMUP):
        loss = step()
    _wait(loss, device)
    return Hand(c, compiled.seconds, time.perf_counter() - start, step)


def _wait(loss: torch.Tensor, device: torch.device) -> None:
    float(loss)
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_hands(job: Job, device: torch.device, rounds: int, steps: int) -> list[Hand]:
    n = len(job.x) // job.batch_size
    batches = [(job.x[i * job.batch_size:(i + 1) * job.batch_size], job.y[i * job.batch_size:(i + 1) * job.batch_size])
               for i in range(n)]
    hands = []
    for c in candidates(job.model(device), device, {}):
        hands.append(build_hand(job, c, device, batches))
        torch._dynamo.reset()   # each setup compiles within dynamo's recompile limit
    for _ in range(rounds):
        for hand in hands:
            start = time.perf_counter()
            for _ in range(steps):
                loss = hand.step()
            _wait(loss, device)
            hand.round_s.append((time.perf_counter() - start) / steps)
    return hands


def warm_up(job: Job, device: torch.device) -> None:
    model = job.model(device)
    optimizer = job.optimizer(model.parameters())
    for precision in ("fp32", "bf16") if fast_bf16(device) else ("fp32",):
        train_step(model, optimizer, [(job.x[:job.batch_size], job.y[:job.batch_size])],
                   autocast=autocast_for(precision, device))


def run_auto(job: Job, steps: int, device: torch.device) -> tuple[Decision, float]:
    start = time.perf_counter()
    decision = tune(job.model(device), job.optimizer, (job.x, job.y), batch_size=job.batch_size, accumulate_steps=1,
                    job_steps=steps, device=device, pinned={})
    elapsed = time.perf_counter() - start
    # the benchmark's own cleanup, so the hand setups compile afresh: untimed, since a training run
    # never does it (and where nothing compiled, its first call is the import of the whole compiler)
    torch._dynamo.reset()
    return decision, elapsed


def loader_ratio(job: Job, c: Candidate, device: torch.device, rounds: int, steps: int) -> float:
    """Median steps/s through the dataloader (2 workers) over median steps/s through memory."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ml.data.prepare import LABEL
    from ml.train.autotune import grouped_steps
    from ml.train.batches import MemoryBatches, ParquetBatches, ParquetSplit

    features = tuple(f"f{i}" for i in range(job.x.shape[1]))
    classes = tuple(str(i) for i in range(job.spec.num_classes))
    group_rows = max(job.batch_size, ROW_GROUP_BYTES // (4 * len(features) + 8))
    g = torch.Generator().manual_seed(1)   # LOADER_GROUPS row groups: the workers stream, not cache, the split
    x = torch.rand(LOADER_GROUPS * group_rows, len(features), generator=g)
    y = torch.randint(0, job.spec.num_classes, (len(x),), generator=g)
    frame = pd.DataFrame(x.numpy(), columns=list(features))
    frame[LABEL] = y.numpy()
    path = Path(tempfile.mkdtemp(prefix="bench-autotune-loader-")) / "train.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=group_rows)
    del frame
    split = ParquetSplit(path, features, classes)
    sources = {"memory": MemoryBatches(x.to(device), y.to(device), job.batch_size, torch.Generator().manual_seed(0)),
               "dataloader": ParquetBatches(split, job.batch_size, torch.Generator().manual_seed(0), device=device,
                                            num_workers=2, persistent_workers=True)}
    model = job.model(device)
    if c.memory_format == "channels_last":
        set_channels_last(model)
    optimizer = job.optimizer(model.parameters())
    autocast = autocast_for(c.precision, device)
    compiled = compile_forward(model, c.compile, example_batches(job.x, job.y, job.batch_size), autocast)
    feeds = {name: grouped_steps(source, 1) for name, source in sources.items()}
    rates: dict[str, list[float]] = {name: [] for name in feeds}
    for round_ in range(rounds + 1):   # the first round warms up (workers start, kernels are chosen)
        for name, feed in feeds.items():
            start = time.perf_counter()
            for _ in range(steps):
                loss = train_step(compiled.forward, optimizer, next(feed), autocast=autocast).loss
            _wait(loss, device)
            if round_:
                rates[name].append(steps / (time.perf_counter() - start))
    for feed in feeds.values():
        feed.close()
    torch._dynamo.reset()
    return statistics.median(rates["dataloader"]) / statistics.median(rates["memory"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="cnn/vit batch size")
    parser.add_argument("--short", type=int, default=300, help="optimizer steps of the short cnn/vit job")
    parser.add_argument("--long", type=int, default=5000, help="optimizer steps of the long cnn/vit job")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--processed", type=Path, default=None,
                        help="a prepared data directory to read the digits job's training split from")
    args = parser.parse_args()
    if args.processed is not None and not (args.processed / "train.parquet").is_file():
        parser.error(f"--processed: expected a prepared data directory holding train.parquet, got {args.processed}")
    device = resolve_device(args.device)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-inductor-"))
    jobs = [digits_job(device, args.processed), synthetic_job("cnn", device, args.batch, args.short, args.long),
            synthetic_job("vit", device, args.batch, args.short, args.long)]
    ratios, overheads = [], []
    print(f"{'job':16} {'setup':28} {'compile s':>9} {'step ms':>8} {'job s':>8}  note", flush=True)
    for job in jobs:
        warm_up(job, device)
        # the long job first: its probe is the one likely to compile, from a cold cache
        autos = {label: run_auto(job, steps, device) for label, steps in sorted(job.lengths.items())}
        hands = run_hands(job, device, args.rounds, args.steps)
        for label, steps in job.lengths.items():
            title = f"{job.name} {label}".strip() + f" ({steps})"
            for hand in hands:
                print(f"{title:16} {hand.candidate.name:28} {hand.compile_s:9.1f} "
                      f"{1000 * statistics.median(hand.round_s):8.2f} {hand.job_s(steps):8.1f}", flush=True)
            decision, probe_s = autos[label]
            chosen = next(h for h in hands if h.candidate == decision.chosen)
            auto_s = probe_s + chosen.job_s(steps)
            best = min(hands, key=lambda h: h.job_s(steps))
            ratios.append(best.job_s(steps) / auto_s)
            overheads.append(probe_s / auto_s)
            print(f"{title:16} {'auto: ' + decision.chosen.name:28} {'':9} {'':8} {auto_s:8.1f}  probe "
                  f"{probe_s:.2f} s; best by hand {best.candidate.name}; {decision.reason}", flush=True)
        if job.name == "cnn":
            chosen = autos["long"][0].chosen
            loader = loader_ratio(job, chosen, device, max(args.rounds, 5), 4 * args.steps)
            print(f"cnn {chosen.name}: dataloader (2 workers) / memory steps/s = {loader:.3f}", flush=True)
    print(f"RESULT auto_vs_best={min(ratios):.3f} auto_overhead={max(overheads):.3f} "
          f"dataloader_vs_memory={loader:.3f}")


if __name__ == "__main__":
    main()
