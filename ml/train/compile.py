"""``train.compile``: the training forward through ``torch.compile``, compiled up front on batches of
the shapes training will see, so compile time is measured apart from the steps and a compiler that
fails (no C++ toolchain, an unsupported operator, a backend bug) leaves training in eager mode with
the reason recorded instead of ending it.

Shapes stay static (``dynamic=False``): an epoch's full batches and its last, smaller one are each
compiled once, here, and evaluation runs on the plain module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class CompiledForward:
    """What training calls, and how it came to be.

    Attributes:
        forward: The compiled module (sharing the plain module's parameters), or the plain module.
        mode: The ``train.compile`` mode asked for.
        compiled: Whether ``forward`` is compiled.
        seconds: Time spent compiling (including a failed attempt).
        fallback_reason: Why training runs eager although a mode was asked for; None otherwise.
    """

    forward: nn.Module
    mode: str
    compiled: bool
    seconds: float
    fallback_reason: str | None = None


def compile_forward(model: nn.Module, mode: str, example_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    autocast: Callable[[], AbstractContextManager[Any]]) -> CompiledForward:
    """Compiles ``model`` in ``mode`` (``off``: returns it as is) by running a training forward and
    backward on each of ``example_batches`` under ``autocast``. The RNG states and the gradients are
    as they were before, so a compiled run and its resume stay bit-identical."""
    if mode == "off":
        return CompiledForward(model, mode, False, 0.0)
    start = time.perf_counter()
    devices = [torch.cuda.current_device()] if any(x.is_cuda for x, _ in example_batches) else []
    was_training = model.training
    try:
        compiled = torch.compile(model, mode=mode, dynamic=False)
        with torch.random.fork_rng(devices=devices):
            model.train()
            for inputs, targets in example_batches:
                with autocast():
                    loss = nn.functional.cross_entropy(compiled(inputs).float(), targets)
                loss.backward()
    # Any failure of the compiler stack (dynamo, inductor, the C++/Triton toolchain) is a reason to
    # train eager, never to stop: the eager module computes the same function.
    except Exception as exc:  # noqa: BLE001
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}"
        return CompiledForward(model, mode, False, time.perf_counter() - start, reason[:300])
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
    return CompiledForward(compiled, mode, True, time.perf_counter() - start)


def example_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One batch of each shape an epoch over ``x`` draws: a full one and the last, smaller one (if any)."""
    sizes = [min(batch_size, len(x))]
    if len(x) > batch_size and len(x) % batch_size:
        sizes.append(len(x) % batch_size)
    return [(x[:n], y[:n]) for n in sizes]
