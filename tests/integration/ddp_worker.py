"""A DDP training run for test_checkpoint_ddp.py, started by ``torchrun --nproc_per_node=2``.

Every rank seeds python, numpy and torch differently and shuffles its shard with its own generator;
the model adds input noise drawn from the python and numpy RNGs and uses dropout (torch RNG), so
an exact resume needs each rank's own RNG states. Writes ``rank<r>.json`` (RNG fingerprints, the
checkpoint resumed from) into ``--out`` and, on rank 0, the final parameters as ``params.safetensors``.

    torchrun ... ddp_worker.py --out DIR [--root CKPT] [--stop-at STEP] [--resume]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ml.checkpoint.manager import CheckpointManager
from ml.train.checkpoints import CheckpointHook, resume
from ml.train.loop import Callback, fit
from ml.model.architectures import MLP, ModelSpec

EPOCHS, BATCH, N = 3, 8, 96  # 48 samples per rank: 6 batches per epoch, 18 steps


class Interrupted(Exception):
    pass


class NoisyInput(nn.Module):
    """Adds noise scaled by ``random.random()`` and drawn from numpy while training."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            noise = np.random.standard_normal(tuple(x.shape)).astype(np.float32)
            x = x + 0.05 * random.random() * torch.from_numpy(noise)
        return self.inner(x)


def rng_fingerprint(generator: torch.Generator) -> str:
    """A digest of this process's python, numpy, torch and shuffling RNG states."""
    digest = hashlib.sha256()
    digest.update(repr(random.getstate()).encode())
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    digest.update(keys.tobytes() + repr((kind, pos, has_gauss, cached)).encode())
    digest.update(torch.get_rng_state().numpy().tobytes())
    digest.update(generator.get_state().numpy().tobytes())
    return digest.hexdigest()


class StopAt(Callback):
    """Records the RNG fingerprint right after the checkpoint of ``step`` and ends the run there."""

    def __init__(self, manager: CheckpointManager | None, step: int | None, generator: torch.Generator,
                 record: dict) -> None:
        self.manager, self.step, self.generator, self.record = manager, step, generator, record

    def on_step_end(self, state, loss: float) -> None:
        if state.global_step == self.step:
            self.record["saved_fingerprint"] = rng_fingerprint(self.generator)
            raise Interrupted


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--root", type=Path)
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    random.seed(10 + rank)
    np.random.seed(20 + rank)
    torch.manual_seed(30 + rank)
    data = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 6, generator=data), torch.randint(0, 3, (N,), generator=data)
    inner = MLP(ModelSpec(6, (16,), 3, 0.3))
    inner.set_input_stats(x.numpy())
    model = DistributedDataParallel(NoisyInput(inner))  # rank 0's initial weights go to every rank
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(100 + rank)
    record: dict = {"rank": rank, "world_size": world, "resumed_from": None}

    manager = CheckpointManager(args.root) if args.root else None
    state = None
    hooks: list = []
    if manager is not None:
        if args.resume:
            result = resume(manager, model, optimizer, generator=generator)
            record["restored_fingerprint"] = rng_fingerprint(generator)
            record["resumed_from"] = result.name
            state = result.state
        hooks.append(CheckpointHook(manager, model, optimizer, generator=generator, every_steps=4))
    hooks.append(StopAt(manager, args.stop_at, generator, record))
    try:
        fit(model, optimizer, (x[rank::world], y[rank::world]), (x[rank::world][:10], y[rank::world][:10]),
            epochs=EPOCHS, batch_size=BATCH, generator=generator, hooks=hooks, state=state)
        record["finished"] = True
    except Interrupted:
        record["finished"] = False
    finally:
        if manager is not None:
            manager.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.detach().clone() for k, v in model.module.state_dict().items()},
                  str(args.out / "params.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
