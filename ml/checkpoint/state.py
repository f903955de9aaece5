"""What a training checkpoint holds: model, optimizer, scheduler and scaler states, the loop's
position, the states of stateful callbacks, and every RNG (python, numpy, torch CPU and CUDA, the
data-shuffling generator), all as tensors and JSON scalars so the state round-trips through
safetensors + JSON without pickle.

The loop's position arrives as a plain ``state_dict()`` mapping: this package never imports the
training loop.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ml.checkpoint.store import CheckpointCorrupt

__all__ = ["capture_rng_state", "restore_rng_state", "restore_training_state", "training_state"]

logger = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (legacy global), torch CPU and CUDA generator states as tensors and JSON
    scalars."""
    py_version, py_mt, py_gauss = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {"version": py_version, "mt": torch.tensor(py_mt, dtype=torch.int64), "gauss_next": py_gauss},
        "numpy": {"bit_generator": bit_generator, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Sets every generator :func:`capture_rng_state` captured. CUDA states saved on a machine
    with a GPU are skipped, with a warning, where there is none."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["bit_generator"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if not torch.cuda.is_available():
            logger.warning("checkpoint holds CUDA RNG states but no CUDA device is available; not restored")
        else:
            torch.cuda.set_rng_state_all(list(state["cuda"]))


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, *, loop: Mapping[str, Any],
                   generator: torch.Generator, scheduler: Any = None, scaler: Any = None,
                   extra: Mapping[str, Any] | None = None,
                   callbacks: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything a bit-identical resume needs. The tensors are the live ones (no copy): hand the
    dict straight to :meth:`CheckpointManager.save_training_checkpoint`, which snapshots it.

    Args:
        loop: the loop's ``state_dict()`` (counters, sampler position, history; tensors and JSON
            scalars only).
        extra: static facts about the training (fingerprint, model spec, dataset...).
        callbacks: ``{name: state_dict}`` of stateful callbacks, handed back on resume.
    """
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "loop": dict(loop),
        "generator": generator.get_state(),
        "rng": capture_rng_state(),
        "extra": dict(extra or {}),
        "callbacks": {str(k): v for k, v in (callbacks or {}).items()},
    }


def restore_training_state(state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, *,
                           generator: torch.Generator, scheduler: Any = None,
                           scaler: Any = None) -> dict[str, Any]:
    """Loads ``state`` (from :func:`training_state`) into freshly built objects and returns the
    loop's state dict, for the loop state's ``load_state_dict``. RNGs are restored last, after
    anything the caller did to build the objects has consumed random numbers.

    Raises:
        CheckpointCorrupt: a scheduler or scaler was given but the checkpoint holds no state for it.
    """
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            if state.get(name) is None:
                raise CheckpointCorrupt(f"checkpoint has no {name} state but a {name} was given")
            obj.load_state_dict(state[name])
    generator.set_state(state["generator"])
    restore_rng_state(state["rng"])
    return dict(state["loop"])
