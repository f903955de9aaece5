"""Where the training loop's batches come from.

A batch source yields one epoch of ``(inputs, targets)`` batches on the training device, knows how
many batches an epoch has on this rank, and has a ``state_dict()``: the position inside the epoch
(batches the loop consumed) and the shuffling generator's state as the epoch began. Both sources
draw their shuffle from the run's data generator (:func:`ml.train.loop.seed_everything`), so the
state is the same two entries for either, which :class:`ml.train.loop.LoopState` stores as
``batch_in_epoch`` and ``epoch_generator_state`` (checkpoints made before batch sources resume
unchanged). Resuming draws the epoch's shuffle again from that state and starts at the position.

:class:`MemoryBatches` indexes whole-split tensors on the device with a seeded permutation.

Distributed (``rank``/``world_size``): every rank draws the same permutation and takes the
samples at ``rank, rank + world_size, ...``, padded first by repeating the permutation's head so
each rank has ``ceil(n / world_size)`` samples and the same number of batches, as
``torch.utils.data.DistributedSampler`` does with ``drop_last=False``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Protocol

import torch

Batch = tuple[torch.Tensor, torch.Tensor]

__all__ = ["Batch", "BatchSource", "MemoryBatches", "shard_order"]


class BatchSource(Protocol):
    """What :func:`ml.train.loop.fit` draws batches from."""

    device: torch.device

    def __len__(self) -> int:
        """Batches in one epoch on this rank."""

    def __iter__(self) -> Iterator[Batch]:
        """The epoch's batches from the current position; starts a new epoch (drawing its shuffle)
        when the position is 0 or the last epoch was used up. Each batch taken advances the
        position by one."""

    def state_dict(self) -> dict[str, Any]:
        """``{"position": batches consumed in the epoch, "epoch_generator_state": the shuffling
        generator's state when the epoch began (None before the first)}``."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def shard_order(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of a permutation, padded as ``DistributedSampler`` pads (module docstring)."""
    if world_size == 1:
        return order
    total = math.ceil(len(order) / world_size) * world_size
    if total > len(order):
        order = torch.cat([order] * math.ceil(total / len(order)))[:total]
    return order[rank:total:world_size]


def check_shard(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank, world_size: expected 0 <= rank < world_size, got {rank}, {world_size}")


class _Position:
    """The epoch position and shuffle state both sources keep, and how a resume restores them."""

    def __init__(self, generator: torch.Generator, per_epoch: int) -> None:
        self.generator, self.per_epoch = generator, per_epoch
        self.position = 0
        self.epoch_generator_state: torch.Tensor | None = None

    def begin(self) -> None:
        """Before drawing an epoch's shuffle: a new epoch saves the generator's state, a resumed
        one sets the generator back to it, so the same draw follows."""
        if self.position >= self.per_epoch:
            self.position = 0
        if self.position == 0:
            self.epoch_generator_state = self.generator.get_state()
        else:
            self.generator.set_state(self.epoch_generator_state)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "epoch_generator_state": self.epoch_generator_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position, generator_state = int(state["position"]), state.get("epoch_generator_state")
        if position and generator_state is None:
            raise ValueError(f"batch source state: position {position} inside an epoch needs the epoch's "
                             "generator state, got none")
        if not 0 <= position <= self.per_epoch:
            raise ValueError(f"batch source state: expected a position in [0, {self.per_epoch}], got {position}")
        self.position, self.epoch_generator_state = position, generator_state


class MemoryBatches:
    """Batches indexed from ``x``/``y`` (whole splits, already on the training device) by a
    permutation drawn from ``generator`` each epoch: the last batch of an epoch may be smaller."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator, *,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if len(x) != len(y) or not len(x):
            raise ValueError(f"x, y: expected the same number (> 0) of rows, got {len(x)} and {len(y)}")
        check_shard(rank, world_size)
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rank, self.world_size = rank, world_size
        self.device = x.device
        self.samples = math.ceil(len(x) / world_size)
        self._pos = _Position(generator, math.ceil(self.samples / batch_size))

    def __len__(self) -> int:
        return self._pos.per_epoch

    def __iter__(self) -> Iterator[Batch]:
        self._pos.begin()
        order = shard_order(torch.randperm(len(self.x), generator=self._pos.generator), self.rank, self.world_size)
        return self._batches(order)

    def _batches(self, order: torch.Tensor) -> Iterator[Batch]:
        pos, size = self._pos, self.batch_size
        while pos.position < pos.per_epoch:
            idx = order[pos.position * size:(pos.position + 1) * size]
            pos.position += 1
            yield self.x[idx], self.y[idx]

    def state_dict(self) -> dict[str, Any]:
        return self._pos.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pos.load_state_dict(state)
