"""Where the training loop's batches come from.

A batch source yields one epoch of ``(inputs, targets)`` batches on the training device, knows how
many batches an epoch has on this rank, and has a ``state_dict()``: the position inside the epoch
(batches the loop consumed) and the shuffling generator's state as the epoch began. Both sources
draw their shuffle from the run's data generator (:func:`ml.train.loop.seed_everything`), so the
state is the same two entries for either, which :class:`ml.train.loop.LoopState` stores as
``batch_in_epoch`` and ``epoch_generator_state`` (checkpoints made before batch sources resume
unchanged). Resuming draws the epoch's shuffle again from that state and starts at the position.

:class:`MemoryBatches` indexes whole-split tensors on the device with a seeded permutation.
:class:`ParquetBatches` streams a prepared Parquet split through a ``torch.utils.data.DataLoader``
(worker processes, pinned memory, non-blocking copies), a row group at a time, so a split larger
than memory trains. Its shuffle is the one streaming allows: each epoch draws a seed; the seed
orders the row groups and, for each row group, its rows; batch ``i`` is rows ``i * batch_size``
onwards of that order, so it depends on the seed and ``i`` alone, whichever worker reads it, and
a resume mid-epoch starts the sampler at the position (no replay). :func:`choose_loader` picks the
source for ``train.loader``.

Distributed (``rank``/``world_size``): every rank draws the same permutation and takes the
samples at ``rank, rank + world_size, ...``, padded first by repeating the permutation's head so
each rank has ``ceil(n / world_size)`` samples and the same number of batches, as
``torch.utils.data.DistributedSampler`` does with ``drop_last=False``. :class:`ParquetBatches`
shards the epoch's batches the same way (every rank the same number of batches; only an epoch's
last batch may be smaller).
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ml.data.contract import LABEL
from ml.data.prepare import table_arrays

Batch = tuple[torch.Tensor, torch.Tensor]

__all__ = ["Batch", "BatchSource", "DATA_WAIT_SHARE", "LoaderChoice", "MemoryBatches", "ParquetBatches", "ParquetSplit",
           "available_cores", "choose_loader", "data_wait_advice", "shard_order", "worker_count"]

logger = logging.getLogger(__name__)

DATA_WAIT_SHARE = 0.30   # data wait above this share of step time: the loop waits for its batches


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


class ParquetSplit:
    """A prepared split (``data/processed/<name>.parquet``) read one row group at a time, memory-mapped
    by pyarrow: its size comes from the file's metadata, and nothing holds the whole table."""

    def __init__(self, path: str | Path, features: Sequence[str], classes: Sequence[str]) -> None:
        self.path, self.features, self.classes = Path(path), tuple(features), tuple(classes)
        meta = pq.ParquetFile(self.path, memory_map=True).metadata
        self.group_rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.rows = sum(self.group_rows)
        self._file: pq.ParquetFile | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the split takes held whole: float32 features and an int64 label per row."""
        return self.rows * (4 * len(self.features) + 8)

    def read_group(self, index: int, features: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Features (float32; none when ``features`` is false) and label indices of one row group."""
        if self._file is None:
            self._file = pq.ParquetFile(self.path, memory_map=True)
        present = set(self._file.schema_arrow.names)   # a missing column is table_arrays' one-line error
        columns = [c for c in ([*self.features, LABEL] if features else [LABEL]) if c in present]
        table = self._file.read_row_group(index, columns=columns)
        return table_arrays(table, self.features if features else (), self.classes, f"{self.path} row group {index}")

    def labels(self) -> np.ndarray:
        """Every row's label index (one column: small beside the features)."""
        return np.concatenate([self.read_group(i, features=False)[1] for i in range(len(self.group_rows))])

    def head(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``rows`` rows (fewer when the split has fewer)."""
        xs, ys, have = [], [], 0
        for i in range(len(self.group_rows)):
            if have >= rows:
                break
            x, y = self.read_group(i)
            xs.append(x[:rows - have])
            ys.append(y[:rows - have])
            have += len(ys[-1])
        return np.concatenate(xs), np.concatenate(ys)

    def input_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and (population) standard deviation over the split, a row group at a
        time (Chan et al.'s pairwise combination of group means and squared deviations, in float64)."""
        count, mean, m2 = 0, np.zeros(len(self.features)), np.zeros(len(self.features))
        for i in range(len(self.group_rows)):
            x = self.read_group(i)[0].astype(np.float64)
            n, group_mean = len(x), x.mean(axis=0)
            delta = group_mean - mean
            m2 += ((x - group_mean) ** 2).sum(axis=0) + delta ** 2 * count * n / (count + n)
            mean += delta * n / (count + n)
            count += n
        return mean.astype(np.float32), np.sqrt(m2 / count).astype(np.float32)

    def stats_rows(self) -> np.ndarray:
        """Two rows whose per-feature mean and population standard deviation are the split's (mean
        minus and plus the deviation): what ``Classifier.set_input_stats`` reads, without the split in
        memory."""
        mean, std = self.input_stats()
        return np.stack([mean - std, mean + std])

    def __getstate__(self) -> dict[str, Any]:   # a DataLoader worker opens its own file handle
        return {**self.__dict__, "_file": None}


class _EpochBatches(Dataset):
    """Batch ``(seed, i)`` of an epoch whose shuffle ``seed`` draws (module docstring). Each worker
    keeps the two row groups it read last, decoded and with their row order."""

    def __init__(self, split: ParquetSplit, batch_size: int) -> None:
        self.split, self.batch_size = split, batch_size
        self._plan: tuple[int, list[int], list[int]] | None = None
        self._groups: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return math.ceil(self.split.rows / self.batch_size)

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        seed, index = key
        order, starts = self._epoch_plan(seed)
        lo, hi = index * self.batch_size, min((index + 1) * self.batch_size, self.split.rows)
        k = bisect.bisect_right(starts, lo) - 1
        xs, ys = [], []
        while lo < hi:
            x, y, rows = self._group(seed, order[k])
            take = rows[lo - starts[k]:min(hi - starts[k], len(rows))]
            xs.append(x[take])
            ys.append(y[take])
            lo += len(take)
            k += 1
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    def _epoch_plan(self, seed: int) -> tuple[list[int], list[int]]:
        """The epoch's row-group order and where each group starts in the epoch's row order."""
        if self._plan is None or self._plan[0] != seed:
            order = torch.randperm(len(self.split.group_rows), generator=torch.Generator().manual_seed(seed)).tolist()
            starts = np.concatenate([[0], np.cumsum([self.split.group_rows[g] for g in order])[:-1]]).tolist()
            self._plan = (seed, order, starts)
        return self._plan[1], self._plan[2]

    def _group(self, seed: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = (seed, group)
        if key not in self._groups:
            x, y = self.split.read_group(group)
            rows = torch.randperm(len(y), generator=torch.Generator().manual_seed((seed + 1_000_003 * (group + 1))
                                                                                 % 2**63)).numpy()
            self._groups[key] = (x, y, rows)
            while len(self._groups) > 2:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key]


class _EpochSampler(Sampler):
    """The keys of this rank's batches from the position on; :class:`ParquetBatches` sets them before
    each pass (workers that persist across epochs see the new ones: the sampler runs in the main
    process)."""

    def __init__(self) -> None:
        self.seed, self.indices = 0, []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.seed, i) for i in self.indices])

    def __len__(self) -> int:
        return len(self.indices)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(requested: int) -> int:
    """``requested`` DataLoader workers, or the cores available to this process when fewer, with
    one warning line saying so."""
    available = available_cores()
    if requested <= available:
        return requested
    logger.warning("train.num_workers: %d is above the %d cores available; using %d", requested, available, available)
    return available


WORKER_NICENESS = 10


def _lower_priority(_worker: int) -> None:
    """A DataLoader worker runs at a lower CPU priority than the training process: on a machine
    whose cores the training's threads fill, a worker that wakes would otherwise preempt one of
    them, and every thread of an intra-op parallel region waits for the slowest. The workers then
    fill the gaps (the prefetched batches cover them); on idle cores the priority changes nothing."""
    try:
        os.nice(WORKER_NICENESS)
    except OSError:   # not allowed here: the worker runs as it is
        pass


class ParquetBatches:
    """Batches of a :class:`ParquetSplit` read by a ``torch.utils.data.DataLoader`` (see the module
    docstring for the shuffle), copied to ``device`` without blocking (from pinned memory on CUDA
    when ``pin_memory``). ``num_workers`` above the cores available is lowered to them
    (:func:`worker_count`)."""

    def __init__(self, split: ParquetSplit, batch_size: int, generator: torch.Generator, *, device: torch.device,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, prefetch_factor: int = 2) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if not split.rows:
            raise ValueError(f"{split.path}: expected rows to train on, got none")
        check_shard(rank, world_size)
        self.split, self.batch_size, self.device = split, batch_size, device
        self.dataset = _EpochBatches(split, batch_size)
        self._mine = shard_order(torch.arange(len(self.dataset)), rank, world_size).tolist()
        self._sampler = _EpochSampler()
        workers = worker_count(num_workers)
        self.num_workers = workers
        extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if workers else {}
        # a generator of its own for the workers' base seed (which nothing here uses): without one,
        # each new iterator draws it from torch's global RNG and shifts dropout's random numbers
        self.loader = DataLoader(self.dataset, batch_size=None, sampler=self._sampler, num_workers=workers,
                                 pin_memory=pin_memory and device.type == "cuda", worker_init_fn=_lower_priority,
                                 generator=torch.Generator().manual_seed(0), **extra)
        self._pos = _Position(generator, len(self._mine))

    def __len__(self) -> int:
        return self._pos.per_epoch

    def __iter__(self) -> Iterator[Batch]:
        self._pos.begin()
        self._sampler.seed = int(torch.randint(0, 2**62, (1,), generator=self._pos.generator))
        self._sampler.indices = self._mine[self._pos.position:]
        return self._batches(iter(self.loader))

    def _batches(self, loaded: Iterator[Batch]) -> Iterator[Batch]:
        for x, y in loaded:
            self._pos.position += 1
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return self._pos.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pos.load_state_dict(state)


@dataclass(frozen=True)
class LoaderChoice:
    """The batch source ``train.loader`` resolves to, and why (one line for the console)."""

    name: str
    reason: str


def choose_loader(loader: str, split_bytes: int, memory_budget: float, device: torch.device,
                  memory: int | None = None) -> LoaderChoice:
    """``memory`` or ``dataloader`` for ``train.loader``: ``auto`` takes memory when the split's
    ``split_bytes`` fit ``memory_budget`` (a fraction) of the machine's ``memory`` (default
    :func:`ml.train.memory.memory_limit_base`: physical RAM or the cgroup limit, the device's memory
    on CUDA). The machine's total, not what is free at the moment, so a resumed run takes the loader
    the interrupted one took."""
    from ml.train.memory import memory_limit_base   # ml.train.memory imports this module

    size = f"{split_bytes / 2**20:.1f} MB"
    if loader != "auto":
        return LoaderChoice(loader, f"train.loader is {loader} (the split: {size})")
    memory = memory_limit_base(device) if memory is None else memory
    where = f"{memory_budget:g} of the {memory / 2**30:.2f} GB of {'device' if device.type == 'cuda' else 'RAM'}"
    if split_bytes <= memory_budget * memory:
        return LoaderChoice("memory", f"the split ({size}) fits train.memory_budget ({where})")
    return LoaderChoice("dataloader", f"the split ({size}) exceeds train.memory_budget ({where})")


def data_wait_advice(data_wait_fraction: float | None, source: BatchSource) -> str | None:
    """One line when waiting for batches took more than :data:`DATA_WAIT_SHARE` of step time,
    naming the setting to change for ``source``; None otherwise."""
    if data_wait_fraction is None or data_wait_fraction <= DATA_WAIT_SHARE:
        return None
    share = f"waiting for batches took {data_wait_fraction:.0%} of step time"
    if isinstance(source, ParquetBatches):
        return (f"{share} with the dataloader ({source.num_workers} workers): raise train.num_workers or "
                "train.prefetch_factor, or set train.loader: memory if the split fits in memory")
    return f"{share} with the memory loader: set train.loader: dataloader with train.num_workers above 0"
