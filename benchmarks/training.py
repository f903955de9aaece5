"""Training speed: the cnn and the vit in fp32 eager, bf16 eager, fp32 compiled and bf16 compiled,
plus bf16 compiled with channels_last (cnn) and bf16 eager with activation checkpointing (vit).

Usage: ``python -m benchmarks.training [--steps 20] [--warmup 3] [--batch 256] [--device auto|cpu|cuda]``.
``--accuracy`` instead trains each built-in model (mlp, cnn, vit) on digits with the repository's
params.yaml and the model's default params, through the train stage, and prints its test accuracy
(the issue's bar: >= 0.95 each), ending with ``RESULT min_test_accuracy=...``.

Each configuration trains the same freshly seeded model on the same fixed synthetic batches (digits'
64 features viewed as 1x8x8 images, 10 classes) through :func:`ml.train.step.train_step`, the step
the training loop runs, with the switches set up as the train stage sets them up
(:mod:`ml.train.speed`, :mod:`ml.train.compile`). Compile time is the up-front compile of
:func:`ml.train.compile.compile_forward`; ``--warmup`` steps follow, then ``--steps`` timed ones.
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
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ml.model.architectures import ModelSpec, build_model, enable_activation_checkpointing, set_channels_last
from ml.train.compile import compile_forward
from ml.train.loop import resolve_device
from ml.train.speed import autocast_for
from ml.train.step import train_step

MODELS = {
    "cnn": ModelSpec(64, (), 10, 0.0, "cnn", (1, 8, 8), {"channels": [32, 64, 64, 128]}),
    "vit": ModelSpec(64, (), 10, 0.0, "vit", (1, 8, 8), {"patch_size": 1, "dim": 64, "depth": 2, "heads": 4}),
}
# (name, precision, compile, channels_last, activation checkpointing, models it applies to)
CONFIGS = [
    ("fp32 eager", "fp32", "off", False, False, ("cnn", "vit")),
    ("bf16 eager", "bf16", "off", False, False, ("cnn", "vit")),
    ("fp32 compiled", "fp32", "default", False, False, ("cnn", "vit")),
    ("bf16 compiled", "bf16", "default", False, False, ("cnn", "vit")),
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


def batches(device: torch.device, batch: int, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [((torch.rand(batch, 64, generator=g) * 16).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
            for _ in range(count)]


def run(name: str, config: tuple, device: torch.device, data: list, steps: int, warmup: int) -> Result:
    label, precision, mode, channels_last, act_ckpt, _ = config
    torch.manual_seed(0)
    model = build_model(MODELS[name]).to(device)
    if channels_last:
        set_channels_last(model)
    if act_ckpt:
        enable_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = autocast_for(precision, device)
    compiled = compile_forward(model, mode, data[:1], autocast)
    if compiled.fallback_reason:
        print(f"{name} {label}: compile failed, eager: {compiled.fallback_reason}", flush=True)
    meter = SavedTensorMeter()
    cuda = device.type == "cuda"
    hooks = nullcontext() if cuda else torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack)
    loss = None
    with hooks:
        for i in range(warmup + steps):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
            out = train_step(compiled.forward, optimizer, [data[i % len(data)]], autocast=autocast)
            meter.step_done()
            loss = out.loss
        final = float(loss)  # waits for the device
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else meter.peak
    return Result(name, label, steps / elapsed, peak / 2**20, compiled.seconds, final)


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
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--accuracy", action="store_true", help="test accuracy of each built-in model instead")
    args = parser.parse_args()
    if args.accuracy:
        accuracy()
        return
    device = resolve_device(args.device)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-inductor-"))
    data = batches(device, args.batch)
    results = []
    print(f"{'model':5} {'configuration':30} {'steps/s':>8} {'peak MiB':>9} {'compile s':>9} {'final loss':>10}")
    for name in MODELS:
        for config in CONFIGS:
            if name in config[5]:
                r = run(name, config, device, data, args.steps, args.warmup)
                results.append(r)
                print(f"{r.model:5} {r.config:30} {r.steps_per_s:8.2f} {r.peak_mb:9.1f} {r.compile_s:9.1f} "
                      f"{r.final_loss:10.4f}", flush=True)
    by = {(r.model, r.config): r for r in results}
    best = max(max(r.steps_per_s for r in results if r.model == m) / by[(m, "fp32 eager")].steps_per_s for m in MODELS)
    gap = max(abs(by[(m, "bf16 eager")].final_loss - by[(m, "fp32 eager")].final_loss) / by[(m, "fp32 eager")].final_loss
              for m in MODELS)
    mem = by[("vit", "fp32 eager act-ckpt")].peak_mb / by[("vit", "fp32 eager")].peak_mb
    print(f"RESULT best_vs_fp32_eager={best:.2f} bf16_loss_gap={gap:.4f} act_ckpt_peak_mem={mem:.3f}")


if __name__ == "__main__":
    main()
