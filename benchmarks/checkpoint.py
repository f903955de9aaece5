"""Checkpoint stall and durable throughput: ours against torch.save + fsync, DCP async_save and dd.

Usage: ``python -m benchmarks.checkpoint [--size-mb 1024] [--dir DIR] [--every auto|N] [--checkpoints 3]
[--rounds 3] [--device auto|cpu|cuda]``.

A training loop keeps the CPU (or the GPU) busy: an MLP whose parameters plus AdamW's two moments
take about ``--size-mb``, trained on a fixed batch. The same loop runs without checkpoints and with
each of three ways to checkpoint every ``--every`` steps (``auto``: at least 8, and enough steps that
one of our saves, timed once with the loop idle, is durable twice over before the next is due: a
loop that asks for checkpoints faster than the disk takes them measures the disk's back-pressure,
not the checkpoint's stall, which on a GPU, where a step takes milliseconds, 8 steps would do):
``torch.save`` of the model and optimizer
state dicts followed by fsync; ``torch.distributed.checkpoint.async_save`` (the previous save is
awaited before the next, as its documentation asks); and :class:`ml.checkpoint.manager.CheckpointManager`
through the same call :class:`ml.train.checkpoints.CheckpointHook` makes, with its defaults (CRC-32C
digests, writer threads at normal priority), with idle writer priority, and with SHA-256 digests. The stall of a method is the
extra wall time of its loop per checkpoint against the loop without checkpoints, the last save
awaited inside the timed region, estimated per iteration with medians (see
:func:`stall_per_checkpoint`); methods run interleaved for ``--rounds`` rounds. On CUDA the state
lives on the GPU, so every method includes the device-to-host copy (ours: into page-locked host
buffers, on a side stream, overlapped with the next forward and backward).

Time to durable is the time from our save call to the commit being durable (files and directory
fsynced), in the loop (where idle priority lengthens it) and with the loop idle. Durable throughput
is the bytes of one of our saves over that time with the loop idle, against ``dd if=/dev/zero
oflag=direct`` of the same size into the same directory. The breakdown says where our time goes;
checksum and write run in parallel threads, so their busy times overlap in the wall time.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

WIDTH = 2048


def build(size_mb: float, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    """An MLP of WIDTH x WIDTH layers whose parameters plus AdamW's two moments take ``size_mb``."""
    per_layer = 3 * 4 * (WIDTH * WIDTH + WIDTH)
    layers = max(1, round(size_mb * 2**20 / per_layer))
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(WIDTH, WIDTH), nn.GELU()]
    model = nn.Sequential(*blocks).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = torch.randn(64, WIDTH, device=device)
    return model, optimizer, batch


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    loss = model(batch).square().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NoCheckpoint:
    label = "no checkpoint"

    def save(self, step: int) -> float:
        return 0.0

    def finish(self) -> None:
        pass


class TorchSave:
    """``torch.save`` of both state dicts into a new file, then fsync: the caller waits for all of it."""

    label = "torch.save + fsync"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        self.model, self.optimizer, self.directory = model, optimizer, directory

    def save(self, step: int) -> float:
        started = time.perf_counter()
        with open(self.directory / f"step-{step}.pt", "wb") as f:
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        return time.perf_counter() - started

    def finish(self) -> None:
        pass


class DcpAsync:
    """``torch.distributed.checkpoint.async_save`` into a new directory per checkpoint."""

    label = "dcp.async_save"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        self.model, self.optimizer, self.directory = model, optimizer, directory
        self.pending = None

    def save(self, step: int) -> float:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        started = time.perf_counter()
        if self.pending is not None:
            self.pending.result()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        self.pending = dcp.async_save({"model": model_sd, "optimizer": optim_sd},
                                      checkpoint_id=str(self.directory / f"step-{step}"))
        return time.perf_counter() - started

    def finish(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None


class Ours:
    """:class:`ml.checkpoint.manager.CheckpointManager`, called as :class:`ml.train.checkpoints.CheckpointHook` does;
    ``checksum`` and ``writer_priority`` None are the manager's defaults."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path,
                 checksum: str | None = None, writer_priority: str | None = None) -> None:
        from ml.checkpoint.manager import CheckpointManager

        self.model, self.optimizer = model, optimizer
        self.stats: list = []
        options = {k: v for k, v in (("checksum", checksum), ("writer_priority", writer_priority)) if v is not None}
        self.manager = CheckpointManager(directory, keep_last=2, on_saved=self.stats.append, **options)
        self.label = f"ours ({self.manager.checksum}, {self.manager.writer_priority})"
        self.generator = torch.Generator().manual_seed(0)

    def state(self, step: int) -> dict:
        from ml.checkpoint.state import training_state
        from ml.train.loop import LoopState

        return training_state(self.model, self.optimizer, loop=LoopState(global_step=step).state_dict(),
                              generator=self.generator)

    def save(self, step: int) -> float:
        started = time.perf_counter()
        self.manager.save_training_checkpoint(self.state(step), step, optimizer=self.optimizer)
        return time.perf_counter() - started

    def finish(self) -> None:
        self.manager.wait()

    def close(self) -> None:
        self.manager.close()


def run_loop(method, model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, *,
             every: int, checkpoints: int, device: torch.device) -> tuple[list[float], float]:
    """``(checkpoints + 1) * every - 1`` iterations, each a training step and, after every
    ``every``-th step, a save; the last save is awaited inside the last iteration, ``every - 1``
    steps after it. Returns each iteration's wall time and the time the save calls blocked."""
    synchronize(device)
    blocked, times = 0.0, []
    iterations = (checkpoints + 1) * every - 1
    for step in range(1, iterations + 1):
        started = time.perf_counter()
        train_step(model, optimizer, batch)
        if step % every == 0:
            blocked += method.save(step)
        if step == iterations:
            method.finish()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times, blocked


def stall_per_checkpoint(runs: list[list[float]], baselines: list[list[float]], every: int, checkpoints: int) -> float:
    """The extra wall time one checkpoint costs the loop: for each iteration position after a
    save (0 = the step that saves), the median over checkpoints and rounds of that iteration's time
    minus the median step time of the loop without checkpoints in the same round, summed over the
    positions up to the next save. Medians keep other processes' bursts on a shared machine out."""
    total = 0.0
    for position in range(every):
        excess = []
        for times, base in zip(runs, baselines):
            typical = statistics.median(base)
            excess += [times[c * every - 1 + position] - typical for c in range(1, checkpoints + 1)]
        total += statistics.median(excess)
    return total


def dd_throughput(directory: Path, nbytes: int) -> float:
    """Bytes per second of ``dd if=/dev/zero oflag=direct`` writing ``nbytes`` into ``directory``."""
    block = 64 << 20
    count = max(1, -(-nbytes // block))
    target = directory / "dd.bin"
    proc = subprocess.run(["dd", "if=/dev/zero", f"of={target}", f"bs={block}", f"count={count}", "oflag=direct"],
                          capture_output=True, text=True, check=True)
    target.unlink()
    match = re.search(r"(\d+) bytes .* copied, ([0-9.]+) s", proc.stderr)
    if match is None:
        raise RuntimeError(f"cannot read dd's output: {proc.stderr.strip()}")
    return int(match.group(1)) / float(match.group(2))


def durable_saves(ours: Ours, repeats: int, device: torch.device) -> list:
    """Saves with the loop idle: time from the call to the durable commit, and where it went."""
    out = []
    for i in range(repeats):
        synchronize(device)
        ours.manager.save_training_checkpoint(ours.state(10_000 + i), 10_000 + i)
        out.append(ours.manager.wait())
    return out


def every_arg(text: str) -> int | None:
    """``--every``: a positive number of steps, or ``auto`` (None)."""
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected auto or a positive number of steps, got {text!r}")
    return int(text)


def auto_every(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, base: Path,
               device: torch.device) -> tuple[int, float, float]:
    """Steps between checkpoints for which the interval is twice our durable time with the loop idle
    (at least 8), with the median step time and that durable time it was sized from."""
    steps = []
    for _ in range(10):
        synchronize(device)
        started = time.perf_counter()
        train_step(model, optimizer, batch)
        synchronize(device)
        steps.append(time.perf_counter() - started)
    directory = base / "sizing"
    directory.mkdir()
    ours = Ours(model, optimizer, directory)
    durable = durable_saves(ours, 2, device)[-1].durable_s  # the first one also allocates the host buffers
    ours.close()
    shutil.rmtree(directory, ignore_errors=True)
    step = statistics.median(steps)
    return max(8, math.ceil(2 * durable / step)), step, durable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024, help="model + AdamW state, in MiB")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory "
                        "under the current one, so on the disk the project lives on)")
    parser.add_argument("--every", type=every_arg, default="auto", help="steps between checkpoints; auto: at least 8, "
                        "and a checkpoint interval of twice the time one save takes to be durable")
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints per timed loop")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all methods")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir or Path.cwd()))
    try:
        report(args, device, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def report(args: argparse.Namespace, device: torch.device, base: Path) -> None:
    model, optimizer, batch = build(args.size_mb, device)
    for _ in range(2):  # AdamW's state exists after the first step
        train_step(model, optimizer, batch)
    nparams = sum(p.numel() for p in model.parameters())
    state_gb = 3 * 4 * nparams / 1e9
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"state: {state_gb:.2f} GB (model {4 * nparams / 1e9:.2f} GB + AdamW moments {8 * nparams / 1e9:.2f} GB) "
          f"on {where}; {os.cpu_count()} cores; torch {torch.__version__}; disk: {base}")
    if args.every is None:
        args.every, step, durable = auto_every(model, optimizer, batch, base, device)
        print(f"a checkpoint every {args.every} steps: a step takes {step:.4f} s and one save {durable:.3f} s to be "
              "durable (loop idle); the interval is twice that, at least 8 steps")

    makers: dict[str, Callable[[Path], object]] = {
        "none": lambda d: NoCheckpoint(),
        "sync": lambda d: TorchSave(model, optimizer, d),
        "dcp": lambda d: DcpAsync(model, optimizer, d),
        "ours": lambda d: Ours(model, optimizer, d),  # the defaults
        "ours_idle": lambda d: Ours(model, optimizer, d, writer_priority="idle"),
        "ours_sha256": lambda d: Ours(model, optimizer, d, checksum="sha256", writer_priority="normal"),
    }
    times: dict[str, list[list[float]]] = {k: [] for k in makers}
    labels = {"none": NoCheckpoint.label, "sync": TorchSave.label, "dcp": DcpAsync.label}
    blocked: dict[str, list[float]] = {k: [] for k in makers}
    ours_stats: dict[str, list] = {k: [] for k in makers if k.startswith("ours")}
    for round_ in range(args.rounds):
        for key, make in makers.items():
            directory = base / f"{key}-{round_}"
            directory.mkdir()
            method = make(directory)
            if key.startswith("ours"):  # warm the host buffers once, as a training run does at its first save
                method.save(0)
                method.finish()
                method.stats.clear()
            per_iteration, held = run_loop(method, model, optimizer, batch, every=args.every,
                                           checkpoints=args.checkpoints, device=device)
            if key.startswith("ours"):
                ours_stats[key] += method.stats
                labels[key] = method.label
                method.close()
            times[key].append(per_iteration)
            blocked[key].append(held / args.checkpoints)
            shutil.rmtree(directory, ignore_errors=True)
    step = statistics.median(t for run in times["none"] for t in run)
    print(f"loop: {(args.checkpoints + 1) * args.every - 1} steps of {step:.3f} s (median), a checkpoint every "
          f"{args.every} steps ({args.checkpoints} per loop), {args.rounds} interleaved rounds")
    print()
    stall = {}
    print(f"{'method':<32}{'loop wall s':>12}{'stall/ckpt s':>14}{'call blocked s':>16}{'durable s':>11}")
    for key, label in labels.items():
        stall[key] = stall_per_checkpoint(times[key], times["none"], args.every, args.checkpoints)
        shown = "-" if key == "none" else f"{stall[key]:.3f}"
        held = "-" if key == "none" else f"{statistics.median(blocked[key]):.3f}"
        durable = f"{statistics.median(s.durable_s for s in ours_stats[key]):.3f}" if ours_stats.get(key) else "-"
        print(f"{label:<32}{statistics.median(sum(run) for run in times[key]):>12.2f}{shown:>14}{held:>16}"
              f"{durable:>11}")
    for key, stats in ours_stats.items():
        if stats:
            print(f"  {labels[key]} in the loop: optimizer.step() held "
                  f"{statistics.median(s.step_wait_s for s in stats):.3f} s/ckpt waiting for the snapshot copy "
                  f"({statistics.median(s.copy_s for s in stats):.3f} s, overlapped with forward/backward); writer "
                  f"busy {statistics.median(s.background_s for s in stats):.3f} s/ckpt, checksum "
                  f"{statistics.median(s.checksum_s for s in stats):.3f} s; save call to durable "
                  f"{statistics.median(s.durable_s for s in stats):.3f} s")

    directory = base / "throughput"
    directory.mkdir()
    ours = Ours(model, optimizer, directory)
    saves = durable_saves(ours, 4, device)[1:]  # the first one also allocates the host buffers
    ours.close()
    ours_sha = Ours(model, optimizer, directory, checksum="sha256", writer_priority="normal")
    saves_sha = durable_saves(ours_sha, 3, device)[1:]
    ours_sha.close()
    nbytes = saves[0].bytes_written
    ours_bps = statistics.median(s.bytes_written / s.durable_s for s in saves)
    dd_bps = statistics.median(dd_throughput(directory, nbytes) for _ in range(3))
    print()
    print(f"{'durable write (loop idle)':<28}{'GB':>8}{'wall s':>10}{'GB/s':>8}")
    durable = statistics.median(s.durable_s for s in saves)
    print(f"{'ours: save call -> durable':<28}{nbytes / 1e9:>8.2f}{durable:>10.3f}{ours_bps / 1e9:>8.2f}")
    sha_durable = statistics.median(s.durable_s for s in saves_sha)
    print(f"{'ours, sha256, normal':<28}{nbytes / 1e9:>8.2f}{sha_durable:>10.3f}"
          f"{statistics.median(s.bytes_written / s.durable_s for s in saves_sha) / 1e9:>8.2f}")
    print(f"{'dd if=/dev/zero oflag=direct':<28}{nbytes / 1e9:>8.2f}{nbytes / dd_bps:>10.3f}{dd_bps / 1e9:>8.2f}")
    med = {f: statistics.median(getattr(s, f) for s in saves) for f in ("copy_s", "checksum_s", "write_s", "fsync_s")}
    print(f"  where our time goes (busy s, per save): snapshot copy {med['copy_s']:.3f} (in the save call), "
          f"checksum {med['checksum_s']:.3f} and write {med['write_s']:.3f} (parallel threads), "
          f"fsync+commit {med['fsync_s']:.3f}")
    sha = {f: statistics.median(getattr(s, f) for s in saves_sha) for f in ("checksum_s", "write_s")}
    print(f"  with sha256 checksums: checksum {sha['checksum_s']:.3f}, write {sha['write_s']:.3f}")
    print()
    x = max(stall["ours"], 0.0) / stall["sync"] if stall["sync"] > 0 else float("nan")
    y = max(stall["ours"], 0.0) / stall["dcp"] if stall["dcp"] > 0 else float("nan")
    z = ours_bps / dd_bps
    durable_loop = statistics.median(s.durable_s for s in ours_stats["ours"])
    print(f"RESULT stall_vs_sync={x:.3f} stall_vs_dcp={y:.3f} throughput_vs_raw={z:.3f} "
          f"stall_s={max(stall['ours'], 0.0):.3f} durable_in_loop_s={durable_loop:.3f} durable_idle_s={durable:.3f}")


if __name__ == "__main__":
    main()
