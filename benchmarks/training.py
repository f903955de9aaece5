"""Training speed: the cnn and the vit in fp32 eager, bf16 eager, fp32 compiled and bf16 compiled,
plus bf16 eager and compiled with channels_last (cnn) and fp32 eager with activation checkpointing (vit).

Usage: ``python -m benchmarks.training [--steps 5] [--rounds 5] [--warmup 3] [--batch 64] [--device auto|cpu|cuda]``.
``--accuracy`` instead trains each built-in model (mlp, cnn, vit) on digits with the repository's
params.yaml and the model's default params, through the train stage, and prints its test accuracy
(the issue's bar: >= 0.95 each), ending with ``RESULT min_test_accuracy=...``.

Each configuration trains the same freshly seeded model on the same fixed synthetic batches (3x32x32
images, 10 classes) through :func:`ml.train.step.train_step`, the step
the training loop runs, with the switches set up as the train stage sets them up
(:mod:`ml.train.speed`, :mod:`ml.train.compile`). Compile time is the up-front compile of
:func:`ml.train.compile.compile_forward`; ``--warmup`` steps follow, then ``--rounds`` rounds of
``--steps`` timed steps, each round stepping every configuration in turn (a configuration's speed is
its median round, so a change in the machine's load touches all configurations alike).
Peak memory is the CUDA allocator's peak on a GPU, and on the CPU the peak of the memory the
autograd graph saves for backward (``torch.autograd.graph.saved_tensors_hooks``), which is what
activation checkpointing trades for recomputation. The last line is::

    RESULT best_vs_fp32_eager=<steps/s of the fastest configuration / fp32 eager, best over both
    models> bf16_loss_gap=<max over models of |loss_bf16 - loss_fp32| / loss_fp32 after the same
    steps, eager> act_ckpt_peak_mem=<vit peak memory with activation checkpointing / without>
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ml.model.architectures import ModelSpec, build_model, enable_activation_checkpointing, set_channels_last
from ml.train.compile import compile_forward
from ml.train.loop import resolve_device
from ml.train.speed import autocast_for
from ml.train.step import train_step

MODELS = {
    # synthetic 3x32x32 images (a CIFAR-sized input): at digits' 8x8 the convolutions are too small for the
    # CPU's bf16 matrix units to matter, and elementwise work (norm, activation, pooling) dominates a step
    # widths where the convolutions, which the bf16 units speed up, outweigh norm, activation and pooling
    "cnn": ModelSpec(3 * 32 * 32, (), 10, 0.0, "cnn", (3, 32, 32), {"channels": [64, 128, 256]}),
    # 4x4 patches: 64 tokens of width 128
    "vit": ModelSpec(3 * 32 * 32, (), 10, 0.0, "vit", (3, 32, 32),
                     {"patch_size": 4, "dim": 128, "depth": 2, "heads": 4}),
}
# (name, precision, compile, channels_last, activation checkpointing, models it applies to)
CONFIGS = [
    ("fp32 eager", "fp32", "off", False, False, ("cnn", "vit")),
    ("bf16 eager", "bf16", "off", False, False, ("cnn", "vit")),
    ("fp32 compiled", "fp32", "default", False, False, ("cnn", "vit")),
    ("bf16 compiled", "bf16", "default", False, False, ("cnn", "vit")),
    ("bf16 eager channels_last", "bf16", "off", True, False, ("cnn",)),
    ("bf16 compiled channels_last", "bf16", "default", True, False, ("cnn",)),
    ("fp32 eager act-ckpt", "fp32", "off", False, True, ("vit",)),
]


@dataclass
class Result:
    model: str
    config: str
    steps_per_s: float
    peak_mb: float
    compile_s: float
    final_loss: float


class SavedTensorMeter:
    """Peak bytes of the tensors autograd saves for backward (CPU peak memory of activations)."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        size = t.numel() * t.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        return t, size

    def unpack(self, packed: tuple[torch.Tensor, int]) -> torch.Tensor:
        return packed[0]

    def step_done(self) -> None:
        self.live = 0


def batches(spec: ModelSpec, device: torch.device, batch: int, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(batch, spec.in_features, generator=g).to(device),
             torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(count)]


@dataclass
class Trainer:
    """One configuration, built and compiled once, then stepped in rounds interleaved with the others."""

    model: str
    config: str
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    autocast: Any
    data: list
    compile_s: float
    meter: SavedTensorMeter = field(default_factory=SavedTensorMeter)
    step_s: list[float] = field(default_factory=list)
    steps_done: int = 0
    loss: float = float("nan")

    def steps(self, count: int, device: torch.device, timed: bool) -> None:
        cuda = device.type == "cuda"
        hooks = nullcontext() if cuda else torch.autograd.graph.saved_tensors_hooks(self.meter.pack, self.meter.unpack)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with hooks:
            for _ in range(count):
                out = train_step(self.forward, self.optimizer, [self.data[self.steps_done % len(self.data)]],
                                 autocast=self.autocast)
                self.meter.step_done()
                self.steps_done += 1
            self.loss = float(out.loss)  # waits for the device
        if timed:
            self.step_s.append((time.perf_counter() - start) / count)


def build(name: str, config: tuple, device: torch.device, batch: int) -> Trainer:
    label, precision, mode, channels_last, act_ckpt, _ = config
    torch.manual_seed(0)
    model = build_model(MODELS[name]).to(device)
    if channels_last:
        set_channels_last(model)
    if act_ckpt:
        enable_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = autocast_for(precision, device)
    data = batches(MODELS[name], device, batch)
    compiled = compile_forward(model, mode, data[:1], autocast)
    if compiled.fallback_reason:
        print(f"{name} {label}: compile failed, eager: {compiled.fallback_reason}", flush=True)
    return Trainer(name, label, compiled.forward, optimizer, autocast, data, compiled.seconds)


def measure(trainers: list[Trainer], device: torch.device, rounds: int, steps: int, warmup: int) -> list[Result]:
    """Warms every configuration up, then times ``rounds`` rounds of ``steps`` steps, each round
    stepping every configuration in turn, so a change in the machine's load during the run touches
    all of them alike; a configuration's speed is its median round. Every configuration runs the
    same number of steps on the same batches, so the final losses compare."""
    for t in trainers:
        t.steps(warmup, device, timed=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    peaks = {}
    for _ in range(rounds):
        for t in trainers:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t.steps(steps, device, timed=True)
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else t.meter.peak
            peaks[(t.model, t.config)] = max(peaks.get((t.model, t.config), 0), peak)
    return [Result(t.model, t.config, 1 / statistics.median(t.step_s), peaks[(t.model, t.config)] / 2**20,
                   t.compile_s, t.loss) for t in trainers]


def accuracy() -> None:
    """Test accuracy of each built-in model with its default params (see the module docstring)."""
    from pathlib import Path

    from ml.config import TrainConfig, load_params
    from ml.data.contract import load_contract
    from ml.data.prepare import load_split, prepare
    from ml.model.predict import predict
    from ml.train.stage import train

    repo = Path(__file__).resolve().parents[1]
    params = load_params(repo / "params.yaml")
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        data = params.data.model_copy(update={k: f"{tmp}/{k}" for k in ("raw_dir", "processed_dir")})
        prepare(data, load_contract(repo / params.contract.path))
        x, y = load_split(data.processed_dir, "test")
        scores = {}
        for name in ("mlp", "cnn", "vit"):
            cfg = TrainConfig.model_validate({**params.train.model_dump(), "model": name,
                                              "model_dir": f"{tmp}/{name}", "metrics_file": f"{tmp}/{name}.json"})
            start = time.perf_counter()
            result = train(cfg, data.processed_dir)
            scores[name] = float((predict(result.model, x).classes == y).mean())
            print(f"{name:4} test_accuracy={scores[name]:.4f} ({cfg.epochs} epochs, "
                  f"{time.perf_counter() - start:.0f} s)", flush=True)
    print(f"RESULT min_test_accuracy={min(scores.values()):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--accuracy", action="store_true", help="test accuracy of each built-in model instead")
    args = parser.parse_args()
    if args.accuracy:
        accuracy()
        return
    device = resolve_device(args.device)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-inductor-"))
    trainers = [build(name, config, device, args.batch) for name in MODELS for config in CONFIGS if name in config[5]]
    results = measure(trainers, device, args.rounds, args.steps, args.warmup)
    print(f"{'model':5} {'configuration':30} {'steps/s':>8} {'peak MiB':>9} {'compile s':>9} {'final loss':>10}")
    for r in results:
        print(f"{r.model:5} {r.config:30} {r.steps_per_s:8.2f} {r.peak_mb:9.1f} {r.compile_s:9.1f} {r.final_loss:10.4f}")
    by = {(r.model, r.config): r for r in results}
    best = max(max(r.steps_per_s for r in results if r.model == m) / by[(m, "fp32 eager")].steps_per_s for m in MODELS)
    gap = max(abs(by[(m, "bf16 eager")].final_loss - by[(m, "fp32 eager")].final_loss) / by[(m, "fp32 eager")].final_loss
              for m in MODELS)
    mem = by[("vit", "fp32 eager act-ckpt")].peak_mb / by[("vit", "fp32 eager")].peak_mb
    print(f"RESULT best_vs_fp32_eager={best:.2f} bf16_loss_gap={gap:.4f} act_ckpt_peak_mem={mem:.3f}")


if __name__ == "__main__":
    main()
