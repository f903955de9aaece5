"""The memory guard: watches memory during training and, when it runs short, trains on smaller
micro-batches without changing what an optimizer step computes.

Every ``check_every_steps`` optimizer steps, before the step runs, it samples the process's RSS,
the system's memory and, on CUDA, torch's allocated, reserved and peak device memory, and logs them
as ``memory/*`` metrics. The limits are fractions of the memory available to the run: on the CPU the
RSS against physical RAM (or the cgroup's limit, when lower), on CUDA the reserved memory against
the device's.

- Above ``soft_limit``: ``gc.collect()`` (and ``torch.cuda.empty_cache()`` on CUDA), an event with
  the figures before and after.
- Still above ``hard_limit``, or a CUDA out-of-memory error inside the step: every micro-batch of
  the step is split in two (half the micro-batch, twice the micro-batches per optimizer step) and,
  after an out-of-memory error, the step is retried. :func:`ml.train.step.train_step` weights each
  micro-batch's loss by its share of the step's samples, so a step over the halves computes what it
  computed over the whole (up to floating-point summation order) on the same samples, in the same
  order. The split stays for the rest of the run and is saved in training checkpoints.
- A micro-batch of one sample cannot shrink: :class:`MemoryExhausted`, one line with the figures.

Hand-written rather than taken from a library: Lightning's and Accelerate's batch-size finders
lower the effective batch (and so change the optimization); this guard never does.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from ml.errors import PipelineError
from ml.tracking.base import NullTracker, Tracker
from ml.train.batches import Batch
from ml.train.loop import Callback, LoopState
from ml.train.step import StepOutput

__all__ = ["EVENTS_ARTIFACT", "MemoryExhausted", "MemoryFigures", "MemoryGuard", "memory_limit_base",
           "sample_memory", "split_micro_batches"]

logger = logging.getLogger(__name__)

EVENTS_ARTIFACT = "events/memory.jsonl"
_MB = 1024 * 1024


class MemoryExhausted(PipelineError):
    """Memory ran short with micro-batches of one sample: nothing left to shrink."""

    exit_code = 7


@dataclass(frozen=True)
class MemoryFigures:
    """One memory sample, in bytes. ``limit_base`` is the memory the guard's limits are fractions of."""

    rss: int
    system_used: int
    system_total: int
    limit_base: int
    cuda_allocated: int | None = None
    cuda_reserved: int | None = None
    cuda_peak: int | None = None

    @property
    def usage(self) -> float:
        """The share of ``limit_base`` in use: CUDA reserved memory on a GPU, else the RSS."""
        return (self.cuda_reserved if self.cuda_reserved is not None else self.rss) / self.limit_base

    def metrics(self) -> dict[str, float]:
        out = {"memory/rss_mb": self.rss / _MB, "memory/system_used_fraction": self.system_used / self.system_total,
               "memory/usage_fraction": self.usage}
        if self.cuda_reserved is not None:
            out |= {"memory/cuda_allocated_mb": self.cuda_allocated / _MB,
                    "memory/cuda_reserved_mb": self.cuda_reserved / _MB, "memory/cuda_peak_mb": self.cuda_peak / _MB}
        return out

    def describe(self) -> str:
        """The figures in one line: ``RSS 812 MB, system 5.2 of 23.4 GB used, ... (usage 97% of 1.0 GB)``."""
        text = f"RSS {self.rss / _MB:.0f} MB, system {self.system_used / 2**30:.1f} of {self.system_total / 2**30:.1f} GB used"
        if self.cuda_reserved is not None:
            text += (f", CUDA allocated {self.cuda_allocated / _MB:.0f} MB, reserved {self.cuda_reserved / _MB:.0f} MB,"
                     f" peak {self.cuda_peak / _MB:.0f} MB")
        return text + f" (usage {self.usage:.0%} of {self.limit_base / 2**30:.2f} GB)"


def memory_limit_base(device: torch.device) -> int:
    """The memory the limits are fractions of: the CUDA device's total, else physical RAM or the
    cgroup (v2) memory limit when that is lower."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    total = psutil.virtual_memory().total
    limit = Path("/sys/fs/cgroup/memory.max")
    try:
        value = limit.read_text().strip()
    except OSError:
        return total
    return min(total, int(value)) if value.isdigit() else total


def sample_memory(device: torch.device, limit_base: int | None = None) -> MemoryFigures:
    """The process's and the system's memory now (and the CUDA device's, on one)."""
    system = psutil.virtual_memory()
    cuda: dict[str, int] = {}
    if device.type == "cuda":
        cuda = {"cuda_allocated": torch.cuda.memory_allocated(device),
                "cuda_reserved": torch.cuda.memory_reserved(device),
                "cuda_peak": torch.cuda.max_memory_allocated(device)}
    return MemoryFigures(psutil.Process(os.getpid()).memory_info().rss, system.total - system.available, system.total,
                         limit_base or memory_limit_base(device), **cuda)


def split_micro_batches(micro_batches: Sequence[Batch], parts: int) -> list[Batch]:
    """Each micro-batch cut into ``parts`` consecutive pieces (sizes differing by one at most; no
    empty piece), in order: the same samples in the same order."""
    if parts == 1:
        return list(micro_batches)
    return [(xs, ys) for x, y in micro_batches for xs, ys in zip(x.tensor_split(parts), y.tensor_split(parts))
            if len(ys)]


class MemoryGuard(Callback):
    """Wraps each optimizer step (:meth:`run_step`, called by :func:`ml.train.loop.fit`); see the
    module docstring. A :class:`ml.train.loop.Callback` for its state (the split) and for logging
    its events as :data:`EVENTS_ARTIFACT` when training ends.

    Args:
        limit_base: bytes the limits are fractions of (default :func:`memory_limit_base`).
        sample: takes a memory sample (default :func:`sample_memory` for ``device``).
    """

    state_key = "memory_guard"

    def __init__(self, check_every_steps: int, soft_limit: float, hard_limit: float, *, device: torch.device,
                 tracker: Tracker | None = None, limit_base: int | None = None,
                 sample: Callable[[], MemoryFigures] | None = None) -> None:
        if check_every_steps < 1:
            raise ValueError(f"check_every_steps: expected an integer >= 1, got {check_every_steps!r}")
        if not (0 < soft_limit <= hard_limit <= 1):
            raise ValueError(f"soft_limit, hard_limit: expected 0 < soft <= hard <= 1, got {soft_limit}, {hard_limit}")
        self.check_every_steps, self.soft_limit, self.hard_limit = check_every_steps, soft_limit, hard_limit
        self.device, self.tracker = device, tracker or NullTracker()
        base = limit_base or memory_limit_base(device)
        self.sample = sample or (lambda: sample_memory(device, base))
        self.split = 1
        self.events: list[dict[str, Any]] = []
        # the largest micro-batch and step seen: the configured ones (an epoch's last may be smaller)
        self._largest = self._accumulate = 0

    def run_step(self, step: Callable[[list[Batch]], StepOutput], micro_batches: Sequence[Batch],
                 step_number: int) -> StepOutput:
        """Runs ``step`` over the step's micro-batches as the guard splits them; samples memory first
        when ``step_number`` is due, and retries the step on smaller micro-batches after a CUDA
        out-of-memory error."""
        self._largest = max(self._largest, *(len(y) for _, y in micro_batches))
        self._accumulate = max(self._accumulate, len(micro_batches))
        if step_number % self.check_every_steps == 0:
            self._check(step_number)
        while True:
            try:
                return step(split_micro_batches(micro_batches, self.split))
            except torch.OutOfMemoryError as exc:
                reason = f"CUDA out of memory ({str(exc).splitlines()[0][:120]})"
            # outside the except block, so the failed step's tensors (held by the traceback) are freed
            self._free()
            self._shrink(step_number, reason, self.sample())

    def _check(self, step_number: int) -> None:
        figures = self.sample()
        self.tracker.log_metrics(figures.metrics(), step=step_number)
        if figures.usage <= self.soft_limit:
            return
        self._free()
        after = self.sample()
        self._event("collect", step_number, f"usage above train.memory.soft_limit {self.soft_limit:g}",
                    before=asdict(figures), after=asdict(after))
        # the console hears of the first collection; the later ones are events and metrics only
        first = sum(e["kind"] == "collect" for e in self.events) == 1
        logger.log(logging.WARNING if first else logging.INFO,
                   "memory: above the soft limit at step %d, collected garbage: %s -> %s", step_number,
                   figures.describe(), after.describe())
        if after.usage > self.hard_limit:
            self._shrink(step_number, f"usage above train.memory.hard_limit {self.hard_limit:g}", after)

    def _shrink(self, step_number: int, reason: str, figures: MemoryFigures) -> None:
        largest = self._largest
        size = math.ceil(largest / self.split)
        parts = self._accumulate * self.split
        if size <= 1:
            self._log_events()
            raise MemoryExhausted(f"memory: {reason} at step {step_number} with micro-batches of 1 sample, which "
                                  f"cannot shrink further: {figures.describe()}; lower train.batch_size or use a "
                                  "smaller model")
        self.split *= 2
        after_size, after_parts = math.ceil(largest / self.split), self._accumulate * self.split
        self._event("shrink", step_number, reason, micro_batch=[size, after_size],
                    micro_batches_per_step=[parts, after_parts], figures=asdict(figures))
        self.tracker.log_metric("memory/micro_batch_split", float(self.split), step_number)
        self.tracker.set_tags({"memory.micro_batch_split": self.split})
        logger.warning("memory: %s at step %d (%s): micro-batch %d -> %d samples, %d -> %d micro-batches per "
                       "optimizer step (the same samples per step)", reason, step_number, figures.describe(), size,
                       after_size, parts, after_parts)

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _event(self, kind: str, step: int, reason: str, **details: Any) -> None:
        self.events.append({"kind": kind, "step": step, "reason": reason, **details})

    def _log_events(self) -> None:
        if self.events:
            self.tracker.log_text("".join(json.dumps(e) + "\n" for e in self.events), EVENTS_ARTIFACT)

    def on_train_end(self, state: LoopState) -> None:
        self._log_events()

    def state_dict(self) -> dict[str, Any]:
        return {"split": self.split, "events": json.dumps(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.split = int(state["split"])
        self.events = json.loads(state.get("events") or "[]")
