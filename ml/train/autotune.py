"""``train.optimize: auto``: measures candidate speed setups on the user's own model and data for a
handful of steps each, and picks the one that finishes the whole job soonest without changing what
it learns.

No library does this (Lightning and Hugging Face leave precision and compile to the user; HF's only
automatic choice, ``auto_find_batch_size``, changes the effective batch), hence this module. It is
longer than the project's usual module: candidates, probe, decision, table and cache are one
feature whose rules below refer to each other, and read best in one place.

Candidates: precision fp32, bf16 where the device has fast bf16 (:func:`ml.train.speed.fast_bf16`),
fp16 on CUDA; compile off and ``default``; channels_last besides contiguous for a model with 2-d
convolutions (the cnn, a factory's network; not the vit, whose only convolution embeds patches).
A non-null ``train.precision``/``compile``/``memory_format`` pins that switch; the switches auto
does not measure (fused AdamW, cudnn.benchmark, TF32) stay as in ``optimize: off``.
When the split does not fit memory, the setups are probed on its head, then the dataloader with
each worker count of ``loaders`` is timed under the chosen setup (:func:`decide`).

Each probe runs on a deep copy of the model with a fresh optimizer of the same kind, on the first
batches of the training split, with the python, numpy and torch (CPU and CUDA) RNG states saved
before and restored after, so the real run is bit-identical to one with the chosen setup written by
hand. A probe compiles (timed), runs ``Policy.loss_steps`` steps and evaluates the loss on the probe
batches (under the candidate's autocast, as validation runs), then times steps until
``Policy.min_seconds`` have passed (between ``min_steps`` and ``max_steps`` steps, the loss steps
after the first counted among them); its speed is the median step's.

Rules (:class:`Policy`):
    numerics: a candidate counts only if its loss after the probe steps is within ``tolerance``
        (relative, 5%: the bar the training benchmark holds bf16 to) of fp32 eager's; NaN fails.
    choice: the counted candidate with the least estimated job time, ``job_steps / steps_per_s +
        compile_s``, and fp32 eager unless that saves at least ``margin`` (5%) of fp32 eager's
        estimate (a smaller gain is within the noise of a shared machine and not worth new numerics).
    probe budget: fp32 eager is always probed (it is the reference and gives the job's estimate).
        Another candidate is probed only if the probing spent so far plus its expected cost (the
        reference's probe seconds, plus for a compiled one the last measured compile seconds or
        ``compile_prior_s``, 30 s: a small conv net's cold compile took 21.5 s on a 2-core CPU)
        stays within ``overhead`` (8%) of the best job estimate so far; the others are listed as
        not probed, so a job too short to pay for probing runs fp32 eager and says so. Compiled
        candidates are probed fastest eager counterpart first.
    nothing counted (every allowed candidate failed, or fp32 eager itself is not finite): fp32
        eager, with the reason.

Cache: the decision is kept in ``autotune.json`` in the checkpoint directory, per (model spec with
its input shape, batch size, accumulation, pinned switches, device and hardware, torch and python
versions); a run with the same key reuses it without measuring, so a resumed or extended run keeps
its setup (and its configuration fingerprint). ``--retune`` measures again. A file that is not
JSON, not this format, or whose entry does not match its key is ignored with one warning line and
rewritten.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from ml.io import atomic_write_json
from ml.tracking.base import Tracker
from ml.model.architectures import enable_activation_checkpointing, set_channels_last
from ml.train.compile import compile_forward, example_batches
from ml.train.speed import SpeedSettings, autocast_for, fast_bf16, grad_scaler_for
from ml.train.step import train_step

logger = logging.getLogger(__name__)

CACHE_FILE = "autotune.json"
CACHE_FORMAT = "mlops-autotune/1"

Batch = tuple[torch.Tensor, torch.Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Policy:
    """The numbers behind the rules of the module docstring."""

    tolerance: float = 0.05
    margin: float = 0.05
    overhead: float = 0.08
    compile_prior_s: float = 30.0
    loss_steps: int = 3
    min_steps: int = 3
    max_steps: int = 30
    min_seconds: float = 0.2
    seed: int = 0


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Candidate(_Frozen):
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"
    workers: int | None = None   # the dataloader's workers, when the split does not fit memory

    @property
    def name(self) -> str:
        mode = "eager" if self.compile == "off" else ("compiled" if self.compile == "default" else self.compile)
        loader = f", dataloader {self.workers} workers" if self.workers is not None else ""
        return f"{self.precision} {mode}" + (" channels_last" if self.memory_format == "channels_last" else "") + loader

    @property
    def compute(self) -> Candidate:
        """The same setup with batches from memory (the probe of its numerics)."""
        return self.model_copy(update={"workers": None})


REFERENCE = Candidate()


class Row(_Frozen):
    """One candidate's line of the decision table; ``rejected`` is None when it counted."""

    candidate: Candidate
    steps_per_s: float | None = None
    compile_s: float | None = None
    job_s: float | None = None
    loss: float | None = None
    loss_gap: float | None = None
    peak_mb: float | None = None
    probe_s: float = 0.0
    rejected: str | None = None


class Decision(_Frozen):
    """The chosen setup, why, and the table it was chosen from."""

    chosen: Candidate
    reason: str
    rows: tuple[Row, ...]
    job_steps: int
    probe_s: float
    loader: Literal["memory", "dataloader"] = "memory"
    cached: bool = False

    def settings(self, base: SpeedSettings) -> SpeedSettings:
        """``base`` (the ``optimize: off`` switches and the explicit keys) with the chosen setup."""
        return SpeedSettings(**{**base.__dict__, **self.chosen.compute.model_dump(exclude={"workers"})})

    def table(self) -> dict[str, list[Any]]:
        """The decision table as columns (MLflow's table artifact layout)."""
        cols: dict[str, list[Any]] = {k: [] for k in ("candidate", "steps_per_s", "compile_s", "est_job_s",
                                                      "loss", "loss_gap", "peak_mb", "probe_s", "rejected")}
        for r in self.rows:
            for key, value in zip(cols, (r.candidate.name, r.steps_per_s, r.compile_s, r.job_s, r.loss,
                                         r.loss_gap, r.peak_mb, r.probe_s, r.rejected or "")):
                cols[key].append(value)
        return cols

    def text_table(self) -> str:
        """The table as compact console lines."""
        num = lambda v, f: "-".rjust(int(f.split(".")[0])) if v is None else format(v, f)  # noqa: E731
        lines = [f"{'candidate':28} {'steps/s':>8} {'compile s':>9} {'est job s':>9} {'loss gap':>8} "
                 f"{'peak MiB':>8}  rejected"]
        lines += [f"{r.candidate.name:28} {num(r.steps_per_s, '8.1f')} {num(r.compile_s, '9.1f')} "
                  f"{num(r.job_s, '9.1f')} {num(r.loss_gap, '8.4f')} {num(r.peak_mb, '8.0f')}  {r.rejected or ''}"
                  for r in self.rows]
        return "\n".join(lines)

    def summary_line(self) -> str:
        """One console line: the choice, where the batches come from, and why."""
        origin = f"; cached in {CACHE_FILE}, --retune measures again" if self.cached else ""
        batches = ("batches from memory" if self.loader == "memory" else
                   "batches from the dataloader" + (" (train.num_workers)" if self.chosen.workers is None else ""))
        return f"train: optimize auto: {self.chosen.name}, {batches} ({self.reason}{origin})"

    def tags(self) -> dict[str, str]:
        """The run tags that summarize the decision."""
        chosen = next((r for r in self.rows if r.candidate == self.chosen), None)
        return {"autotune.choice": self.chosen.name, "autotune.reason": self.reason[:4000],
                "autotune.cached": str(self.cached).lower(), "autotune.probe_s": f"{self.probe_s:.2f}",
                "autotune.est_job_s": "" if chosen is None or chosen.job_s is None else f"{chosen.job_s:.2f}",
                "autotune.probed": str(sum(1 for r in self.rows if r.steps_per_s is not None))}


def candidates(model: nn.Module, device: torch.device, pinned: dict[str, str | None]) -> list[Candidate]:
    """Every setup worth measuring for ``model`` on ``device``, within the ``pinned`` switches
    (``precision``/``compile``/``memory_format``: a value pins it, None leaves it to measure)."""
    precisions = ["fp32"] + (["bf16"] if fast_bf16(device) else []) + (["fp16"] if device.type == "cuda" else [])
    # channels_last where train.memory_format allows it: 2-d convolutions beyond the vit's patch embedding
    spec_name = getattr(getattr(model, "spec", None), "name", None)
    convolutional = spec_name not in ("mlp", "vit") and any(isinstance(m, nn.Conv2d) for m in model.modules())
    options = {"precision": precisions, "compile": ["off", "default"],
               "memory_format": ["contiguous", "channels_last"] if convolutional else ["contiguous"]}
    options.update({k: [v] for k, v in pinned.items() if v is not None})
    return [Candidate(precision=p, compile=c, memory_format=m)
            for c in options["compile"] for m in options["memory_format"] for p in options["precision"]]


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restores the python, numpy and torch (CPU and every CUDA device) RNG states on exit."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


Measure = Callable[[Candidate], Row]


def probe_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, accumulate_steps: int) -> list[list[Batch]]:
    """The probe's steps: consecutive full batches from the start of the split (no RNG drawn),
    ``accumulate_steps`` micro-batches a step, repeating the split when it is short."""
    size = min(batch_size, len(x))
    count = max(len(x) // size, 1)
    micro = [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(min(count, 8))]
    return [[micro[(s * accumulate_steps + a) % len(micro)] for a in range(accumulate_steps)] for s in range(4)]


def measurer(model: nn.Module, make_optimizer: OptimizerFactory, steps: Sequence[Sequence[Batch]],
             compile_shapes: Sequence[Batch], device: torch.device, policy: Policy,
             activation_checkpointing: bool = False,
             dataloader: Callable[[int], Iterable[Batch]] | None = None) -> Measure:
    """The real probe of the module docstring, as a function of the candidate (the seam the tests
    replace with a fake for the decision logic). A candidate with ``workers`` takes its batches
    from ``dataloader(workers)`` and is timed only (the loader does not change the math)."""

    def measure(c: Candidate) -> Row:
        start = time.perf_counter()
        torch.manual_seed(policy.seed)
        probe = copy.deepcopy(model)
        if c.memory_format == "channels_last":
            set_channels_last(probe)
        if activation_checkpointing:
            enable_activation_checkpointing(probe)
        optimizer = make_optimizer(probe.parameters())
        autocast, scaler = autocast_for(c.precision, device), grad_scaler_for(c.precision, device)
        _reset_peak(device)
        compiled = compile_forward(probe, c.compile, compile_shapes, autocast)
        if compiled.fallback_reason is not None:
            torch._dynamo.reset()
            return Row(candidate=c, compile_s=compiled.seconds, probe_s=time.perf_counter() - start,
                       rejected=f"compile failed: {compiled.fallback_reason}")
        feed = grouped_steps(dataloader(c.workers), len(steps[0])) if c.workers is not None and dataloader else None

        def step(i: int) -> Any:
            return train_step(compiled.forward, optimizer, next(feed) if feed else steps[i % len(steps)],
                              autocast=autocast, scaler=scaler)

        # the median step, each waited for: a burst of load from another process moves it less than the
        # mean. The loss steps after the first (which pays first-call costs) are timed samples too.
        times: list[float] = []
        for i in range(policy.loss_steps):
            begin = time.perf_counter()
            float(step(i).loss)
            if i:
                times.append(time.perf_counter() - begin)
        loss = _loss(probe, steps, autocast) if feed is None else None
        timed_start, done = time.perf_counter(), policy.loss_steps
        while len(times) < policy.min_steps or (len(times) < policy.max_steps
                                                and time.perf_counter() - timed_start < policy.min_seconds):
            begin = time.perf_counter()
            float(step(done).loss)  # waits for the device
            times.append(time.perf_counter() - begin)
            done += 1
        if feed is not None:
            feed.close()   # ends the loader's workers
        if c.compile != "off":
            torch._dynamo.reset()  # the real run compiles afresh, within dynamo's recompile limit
        return Row(candidate=c, steps_per_s=1 / statistics.median(times), compile_s=compiled.seconds, loss=loss,
                   peak_mb=_peak_mb(device), probe_s=time.perf_counter() - start)

    return measure


def grouped_steps(source: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Steps of ``size`` micro-batches from ``source``, its epochs repeated for as long as asked."""
    while True:
        batches = iter(source)
        group: list[Batch] = []
        for batch in batches:
            group.append(batch)
            if len(group) == size:
                yield group
                group = []


@torch.no_grad()
def _loss(model: nn.Module, steps: Sequence[Sequence[Batch]], autocast: Callable[[], Any]) -> float:
    model.eval()
    batches = [b for s in steps for b in s]
    total = 0.0
    for inputs, targets in batches:
        with autocast():
            total += float(nn.functional.cross_entropy(model(inputs).float(), targets))
    model.train()
    return total / len(batches)


def _reset_peak(device: torch.device) -> None:
    """Resets the peak-memory watermark: the CUDA allocator's, or on Linux the process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb(device: torch.device) -> float | None:
    """CUDA: the allocator's peak; CPU (Linux): the process's peak RSS since :func:`_reset_peak`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((s for s in status.splitlines() if s.startswith("VmHWM:")), None)
    return None if line is None else int(line.split()[1]) / 1024


def decide(options: Sequence[Candidate], measure: Measure, job_steps: int, policy: Policy = Policy(),
           loaders: Sequence[int] = ()) -> Decision:
    """Probes within the budget and chooses (the rules of the module docstring). ``options`` are
    the candidates allowed; fp32 eager is probed as the reference whether allowed or not. With
    ``loaders`` (the split does not fit memory), the dataloader with each of those worker counts is
    then probed under the chosen setup, eager (compiling once per loader would cost more than it
    tells), and the fastest taken; its estimate adds the chosen setup's compile seconds."""
    rows: dict[Candidate, Row] = {}
    chosen_compile_s = 0.0

    def estimate(row: Row) -> Row:
        if row.rejected is not None or row.steps_per_s is None:
            return row
        job = job_steps / row.steps_per_s + (row.compile_s or 0.0)
        if row.candidate.workers is not None:
            return row.model_copy(update={"job_s": job + chosen_compile_s})
        if row.candidate == REFERENCE:
            return row.model_copy(update={"job_s": job, "loss_gap": 0.0} if math.isfinite(row.loss or math.nan)
                                  else {"job_s": job, "rejected": f"loss {row.loss} is not finite"})
        ref_loss = rows[REFERENCE].loss
        gap = abs(row.loss - ref_loss) / abs(ref_loss) if row.loss is not None and ref_loss else math.nan
        rejected = None
        if not math.isfinite(gap) or gap > policy.tolerance:
            rejected = (f"loss {row.loss:.4g} vs fp32 eager {ref_loss:.4g}: gap "
                        f"{'not finite' if not math.isfinite(gap) else f'{gap:.1%}'} > {policy.tolerance:.0%}")
        return row.model_copy(update={"job_s": job, "loss_gap": gap if math.isfinite(gap) else None,
                                      "rejected": rejected})

    rows[REFERENCE] = estimate(measure(REFERENCE))
    reference = rows[REFERENCE]
    spent = reference.probe_s
    best = reference.job_s if reference.rejected is None else None
    compile_cost = policy.compile_prior_s
    eager = [c for c in _with_eager_counterparts(options) if c.compile == "off" and c != REFERENCE]
    compiled = [c for c in options if c.compile != "off"]

    def eager_job(c: Candidate) -> float:
        row = rows.get(c.model_copy(update={"compile": "off"}))
        return row.job_s if row is not None and row.job_s is not None and row.rejected is None else math.inf

    def probe(c: Candidate) -> None:
        nonlocal spent, best, compile_cost
        counterpart = rows.get(c.model_copy(update={"compile": "off"}))
        if (c.compile != "off" and counterpart is not None and counterpart.steps_per_s is not None
                and counterpart.rejected is not None):
            rows[c] = Row(candidate=c, rejected="not probed: its eager counterpart was rejected")
            return
        expected = reference.probe_s + (compile_cost if c.compile != "off" else 0.0)
        if best is None:
            rows[c] = Row(candidate=c, rejected="not probed: fp32 eager, the reference, failed")
            return
        if spent + expected > policy.overhead * best:
            rows[c] = Row(candidate=c, rejected=f"not probed: ~{expected:.2g} s more probing would exceed "
                                                f"{policy.overhead:.0%} of the ~{best:.3g} s job")
            return
        row = rows[c] = estimate(measure(c))
        spent += row.probe_s
        if row.compile_s and c.compile != "off":
            compile_cost = row.compile_s
        if row.rejected is None and row.job_s is not None:
            best = min(best, row.job_s)

    # the setup with the most speed switches on first (lower precision, then channels_last): when the
    # budget allows one or two probes besides the reference, they go to the likeliest winners
    for c in sorted(eager, key=lambda c: (c.precision == "fp32", c.memory_format != "channels_last")):
        probe(c)
    for c in sorted(compiled, key=eager_job):
        probe(c)
    table = tuple(rows[c] for c in [REFERENCE, *[c for c in rows if c != REFERENCE]])
    choice = _choose(table, options, policy)
    if not loaders:
        return Decision(**choice, rows=table, job_steps=job_steps, probe_s=spent)
    chosen_row = rows.get(choice["chosen"])
    chosen_compile_s = chosen_row.compile_s or 0.0 if chosen_row is not None else 0.0
    for workers in loaders:
        probe(choice["chosen"].model_copy(update={"compile": "off", "workers": workers}))
    timed = [rows[c] for c in rows if c.workers is not None and rows[c].job_s is not None]
    if timed:
        fastest = min(timed, key=lambda r: r.job_s)
        choice = {"chosen": choice["chosen"].model_copy(update={"workers": fastest.candidate.workers}),
                  "reason": f"{choice['reason']}; dataloader: {fastest.candidate.workers} workers fastest"}
    else:
        choice["reason"] += "; dataloader workers not probed: train.num_workers"
    table = tuple(rows[c] for c in [REFERENCE, *[c for c in rows if c != REFERENCE]])
    return Decision(**choice, rows=table, job_steps=job_steps, probe_s=spent, loader="dataloader")


def _with_eager_counterparts(options: Sequence[Candidate]) -> list[Candidate]:
    """The eager candidates, plus the eager form of each compiled one (it orders the compiled
    probes, and a setup whose eager loss disagrees is not compiled)."""
    out: list[Candidate] = []
    for c in options:
        e = c.model_copy(update={"compile": "off"})
        if e not in out:
            out.append(e)
    return out


def _choose(rows: Sequence[Row], options: Sequence[Candidate], policy: Policy) -> dict[str, Any]:
    counted = [r for r in rows if r.rejected is None and r.job_s is not None and r.candidate in options]
    reference = rows[0]
    if not counted:
        why = "; ".join(f"{r.candidate.name}: {r.rejected}" for r in rows if r.rejected)
        return {"chosen": REFERENCE, "reason": f"no candidate passed, fp32 eager: {why}"}
    best = min(counted, key=lambda r: r.job_s)
    probed = sum(1 for r in rows if r.steps_per_s is not None)
    if reference in counted and best is not reference and best.job_s > (1 - policy.margin) * reference.job_s:
        return {"chosen": REFERENCE, "reason": f"est. job {reference.job_s:.3g} s; the fastest other setup, "
                f"{best.candidate.name}, saves under {policy.margin:.0%}"}
    if probed == 1 and best is reference:
        return {"chosen": REFERENCE, "reason": f"est. job {reference.job_s:.3g} s, too short to probe other "
                f"setups within {policy.overhead:.0%} of it"}
    others = sorted((r for r in counted if r is not best), key=lambda r: r.job_s)
    beside = f"; next {others[0].candidate.name} {others[0].job_s:.3g} s" if others else ""
    return {"chosen": best.candidate, "reason": f"est. job {best.job_s:.3g} s{beside}; {probed} probed"}


def cache_key(model_spec: dict[str, Any], batch_size: int, accumulate_steps: int, pinned: dict[str, Any],
              activation_checkpointing: bool, device: torch.device) -> dict[str, Any]:
    """What the cached decision depends on (the module docstring's key)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        hardware = f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
    else:
        hardware = (f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} "
                    f"{torch.get_num_threads()} threads")
    return {"model": model_spec, "batch_size": batch_size, "accumulate_steps": accumulate_steps,
            "pinned": pinned, "activation_checkpointing": activation_checkpointing, "device": device.type,
            "hardware": hardware, "torch": torch.__version__, "python": platform.python_version()}


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Entry(_Frozen):
    key: dict[str, Any]
    decision: Decision


class _CacheFile(_Frozen):
    format: Literal["mlops-autotune/1"]
    entries: dict[str, _Entry]


def read_cache(path: Path) -> dict[str, _Entry]:
    """The entries of the cache file at ``path``; a missing file is empty, and one that is not this
    format or holds an entry under another key's digest is ignored with one warning line."""
    if not path.is_file():
        return {}
    try:
        entries = _CacheFile.model_validate_json(path.read_bytes()).entries
        bad = next((d for d, e in entries.items() if _digest(e.key) != d), None)
        if bad is not None:
            raise ValueError(f"entry {bad} does not match its key")
        return entries
    except (ValidationError, ValueError, OSError) as exc:
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            why = f"{where}: {first['msg']}" if where else first["msg"]
        else:
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = f"autotune: ignoring {path} ({why}); measuring again"
        logger.info(message)   # info: a warning would reach the console a second time (logging's lastResort)
        print(message, file=sys.stderr, flush=True)
        return {}


def tune(model: nn.Module, make_optimizer: OptimizerFactory, train: Batch, *, batch_size: int,
         accumulate_steps: int, job_steps: int, device: torch.device, pinned: dict[str, str | None],
         activation_checkpointing: bool = False, cache_dir: str | Path | None = None, retune: bool = False,
         policy: Policy = Policy(), measure: Measure | None = None,
         dataloader: Callable[[int], Iterable[Batch]] | None = None, loaders: Sequence[int] = ()) -> Decision:
    """The decision for training ``model`` (on ``device``, not yet converted to any setup) on the
    ``train`` tensors (the split, or its head when it does not fit memory: then ``dataloader(n)``
    gives the split's batches through n workers, for each n of ``loaders``): from the cache in
    ``cache_dir`` when it has the key (unless ``retune``), else measured (``measure`` replaces the
    real probe) and written there. Probing leaves ``model`` and every RNG state as they were."""
    key = cache_key(model.spec.to_json() if hasattr(model, "spec") else {"class": type(model).__qualname__},
                    batch_size, accumulate_steps, pinned, activation_checkpointing, device)
    key["loaders"] = list(loaders)
    digest, path = _digest(key), Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    entries = read_cache(path) if path is not None else {}
    if digest in entries and not retune:
        return entries[digest].decision.model_copy(update={"cached": True})
    x, y = train
    steps = probe_batches(x, y, batch_size, accumulate_steps)
    shapes = example_batches(x, y, batch_size)
    with preserved_rng():
        decision = decide(candidates(model, device, pinned),
                          measure or measurer(model, make_optimizer, steps, shapes, device, policy,
                                              activation_checkpointing, dataloader),
                          job_steps, policy, loaders)
    if path is not None:
        entries = {**entries, digest: _Entry(key=key, decision=decision)}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"format": CACHE_FORMAT,
                                 "entries": {d: e.model_dump(mode="json") for d, e in entries.items()}})
    return decision


def record_decision(tracker: Tracker, decision: Decision) -> None:
    """The decision on the run: ``autotune.*`` tags, the table as an MLflow table artifact
    (``autotune/decision.json``, columns and rows as ``mlflow.log_table`` writes them), and one
    console line; the table itself goes to the console too when a fresh measurement chose other
    than fp32 eager (the tiny default run prints the one line)."""
    columns = decision.table()
    tracker.set_tags(decision.tags())
    tracker.log_text(json.dumps({"columns": list(columns), "data": [list(r) for r in zip(*columns.values())]}),
                     "autotune/decision.json")
    line = decision.summary_line()
    logger.info("%s", line)
    if decision.chosen != REFERENCE and not decision.cached:
        print(decision.text_table(), flush=True)
    print(line, flush=True)
