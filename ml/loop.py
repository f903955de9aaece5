"""The training loop. It reads top to bottom; it records through a Tracker and saves through hooks,
and never calls MLflow or torch.save itself."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ml.tracking import NullTracker, Tracker


@dataclass
class LoopState:
    """Where the loop is. ``batch_in_epoch`` is the sampler position: batches of the current epoch
    already consumed. ``epoch_generator_state`` is the shuffling RNG as it was when the epoch began,
    so the same permutation can be drawn again on resume."""

    epoch: int = 0
    global_step: int = 0
    batch_in_epoch: int = 0
    epoch_generator_state: torch.Tensor | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    stop: bool = False


class LoopHooks(Protocol):
    """Called by :func:`fit`; a checkpoint manager or an early stopper plugs in here."""

    def on_step_end(self, state: LoopState, loss: float) -> None: ...
    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None: ...


def seed_everything(seed: int) -> torch.Generator:
    """Seeds python, numpy and torch; returns the generator that shuffles the training data."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def batches_per_epoch(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


@torch.no_grad()
def evaluate_split(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> dict[str, float]:
    """Mean cross-entropy and accuracy over a whole split."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size])
        loss_sum += nn.functional.cross_entropy(logits, y[i:i + batch_size], reduction="sum").item()
        correct += (logits.argmax(dim=1) == y[i:i + batch_size]).sum().item()
    return {"loss": loss_sum / len(x), "accuracy": correct / len(x)}


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    tracker: Tracker | None = None,
    hooks: Sequence[LoopHooks] = (),
    state: LoopState | None = None,
) -> LoopState:
    """Trains for ``epochs``; continues from ``state`` (possibly mid-epoch) when one is given."""
    tracker = tracker or NullTracker()
    state = state or LoopState()
    x_train, y_train = train
    n = len(x_train)
    while state.epoch < epochs and not state.stop:
        if state.batch_in_epoch == 0:
            state.epoch_generator_state = generator.get_state()
        else:  # resuming mid-epoch: draw the same permutation the interrupted epoch used
            generator.set_state(state.epoch_generator_state)
        order = torch.randperm(n, generator=generator)
        model.train()
        for b in range(state.batch_in_epoch, batches_per_epoch(n, batch_size)):
            idx = order[b * batch_size:(b + 1) * batch_size]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.global_step += 1
            state.batch_in_epoch = b + 1
            for hook in hooks:
                hook.on_step_end(state, loss.item())
        train_metrics = evaluate_split(model, x_train, y_train)
        val_metrics = evaluate_split(model, *val)
        metrics = {"train_loss": train_metrics["loss"], "train_accuracy": train_metrics["accuracy"],
                   "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"]}
        state.epoch += 1
        state.batch_in_epoch = 0
        state.history.append({"epoch": state.epoch, "step": state.global_step, **metrics})
        tracker.log_metrics(metrics, step=state.epoch)
        for hook in hooks:
            hook.on_epoch_end(state, metrics)
    return state
