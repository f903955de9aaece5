"""A Markdown summary of a training run, with recommendations from explicit rules.

:func:`summary_report` takes what the caller has, as plain data, and leaves out the section of
every input that is missing:

- ``history``: per-epoch rows as in ``LoopState.history`` (``epoch``, ``step`` and metrics);
- ``resources``: peaks as ``SystemMetricsSampler.peaks()`` returns them (``system/peak/cpu_percent``,
  ``.../process_rss_mb``, ``.../memory_used_percent``, ``.../gpu0/memory_used_mb``,
  ``.../gpu0/utilization_percent``; prefixes optional), plus totals ``memory_total_mb`` and
  ``gpu<i>/memory_total_mb`` (see :func:`memory_totals`) for the headroom rule;
- ``timing``: an ``ml.train.loop.StepTiming`` or a mapping with ``steps``, ``samples``, ``data_s``,
  ``compute_s``, ``wall_s`` (seconds summed over the steps);
- ``checkpoints``: ``ml.checkpoint.manager.SaveStats`` records (or mappings with ``blocking_s``,
  ``background_s``, ``bytes_written``), or one mapping of totals with ``saves`` besides those keys;
- ``anomalies``: ``ml.observe.anomaly.AnomalyEvent`` records or mappings with the same fields;
- ``stop_reason``: why training stopped before its last epoch (``LoopState.stop_reason``), if it did.

Which way a metric improves comes from the one table in :mod:`ml.metrics`.

The rules are in :func:`recommendations`; each has a stable id and a threshold constant below.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ml.metrics import direction

DATA_WAIT_SHARE = 0.30        # data wait above this share of step time: bound by data loading
MEMORY_HEADROOM_SHARE = 0.50  # peak memory below this share of the total: a larger batch may fit
CHECKPOINT_BLOCKING_SHARE = 0.05  # checkpoint blocking above this share of step time: save less often
FLAT_TOLERANCE = 0.01         # a trend moving less than this share of its level over the window is flat
MAX_ANOMALY_ROWS = 20
EARLY_STOPPING_PREFIX = "early stopping"  # how ml.train.callbacks.EarlyStopping's stop reasons begin

@dataclass(frozen=True)
class Recommendation:
    """One rule that fired: ``rule`` is a stable id, ``finding`` what the inputs show, ``advice``
    what to try."""

    rule: str
    finding: str
    advice: str


@dataclass(frozen=True)
class MetricSummary:
    name: str
    mode: str
    best: float
    best_epoch: Any
    best_step: Any
    first: float
    last: float
    trend: str


def slope(values: Sequence[float]) -> float:
    """Least-squares slope per index of ``values`` (0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den


def trend(values: Sequence[float], mode: str, window: int = 5, flat_tolerance: float = FLAT_TOLERANCE) -> str:
    """``"improving"``, ``"flat"`` or ``"worsening"`` over the last ``window`` finite values: the
    least-squares change across the window, relative to the window's mean level, against
    ``flat_tolerance``. ``"n/a"`` for fewer than two values."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode: expected one of min, max, got {mode!r}")
    if window < 2:
        raise ValueError(f"window: expected an integer >= 2, got {window!r}")
    tail = [v for v in values if math.isfinite(v)][-window:]
    if len(tail) < 2:
        return "n/a"
    change = slope(tail) * (len(tail) - 1)
    level = max(abs(sum(tail) / len(tail)), 1e-12)
    if abs(change) <= flat_tolerance * level:
        return "flat"
    return "improving" if (change < 0) == (mode == "min") else "worsening"


def _metric_names(history: Sequence[Mapping[str, Any]]) -> list[str]:
    names = dict.fromkeys(k for row in history for k, v in row.items()
                          if k not in ("epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool))
    return list(names)


def summarize_metrics(history: Sequence[Mapping[str, Any]], modes: Mapping[str, str] | None = None,
                      window: int = 5) -> list[MetricSummary]:
    """Best value (with its epoch and step), first, last and trend of every numeric metric."""
    out = []
    for name in _metric_names(history):
        mode = (modes or {}).get(name) or direction(name)
        rows = [row for row in history if isinstance(row.get(name), (int, float)) and math.isfinite(row[name])]
        if not rows:
            continue
        pick = min if mode == "min" else max
        best_row = pick(rows, key=lambda r: r[name])  # the first row reaching the best value
        out.append(MetricSummary(name, mode, float(best_row[name]), best_row.get("epoch"), best_row.get("step"),
                                 float(rows[0][name]), float(rows[-1][name]),
                                 trend([float(r[name]) for r in rows], mode, window)))
    return out


def _field(record: Any, name: str, default: Any = None) -> Any:
    if isinstance(record, Mapping):
        return record.get(name, default)
    return getattr(record, name, default)


def _normalize_resources(resources: Mapping[str, float]) -> dict[str, float]:
    """Keys without the sampler's prefixes: ``system/peak/gpu0/memory_used_mb`` -> ``gpu0/memory_used_mb``."""
    out = {}
    for key, value in resources.items():
        short = key.split("peak/", 1)[1] if "peak/" in key else key
        short = short[len("system/"):] if short.startswith("system/") else short
        out[short] = float(value)
    return out


def _gpu_indices(resources: Mapping[str, float]) -> list[str]:
    return sorted({m.group(1) for k in resources for m in [re.match(r"gpu(\d+)/", k)] if m}, key=int)


def _timing(timing: Any) -> dict[str, float] | None:
    if timing is None:
        return None
    steps = _field(timing, "steps", 0) or 0
    wall = _field(timing, "wall_s", 0.0) or 0.0
    if steps <= 0 or wall <= 0:
        return None
    data, compute = _field(timing, "data_s"), _field(timing, "compute_s")
    samples = _field(timing, "samples")
    out = {"steps": float(steps), "wall_s": float(wall), "mean_step_s": wall / steps}
    if samples:
        out["samples_per_s"] = samples / wall
    else:
        out["steps_per_s"] = steps / wall
    if data is not None and compute is not None and data + compute > 0:
        out["data_share"] = data / (data + compute)
        out["data_s"], out["compute_s"] = float(data), float(compute)
    return out


def _checkpoints(checkpoints: Any) -> dict[str, float] | None:
    if checkpoints is None:
        return None
    if isinstance(checkpoints, Mapping):
        return {"saves": float(checkpoints.get("saves", 0)), "blocking_s": float(checkpoints.get("blocking_s", 0.0)),
                "background_s": float(checkpoints.get("background_s", 0.0)),
                "bytes_written": float(checkpoints.get("bytes_written", 0))}
    records = list(checkpoints)
    if not records:
        return None
    return {"saves": float(len(records)),
            "blocking_s": sum(float(_field(r, "blocking_s", 0.0)) for r in records),
            "background_s": sum(float(_field(r, "background_s", 0.0)) for r in records),
            "bytes_written": sum(float(_field(r, "bytes_written", 0)) for r in records)}


def recommendations(history: Sequence[Mapping[str, Any]] = (), *, resources: Mapping[str, float] | None = None,
                    timing: Any = None, checkpoints: Any = None, anomalies: Iterable[Any] | None = None,
                    stop_reason: str | None = None, modes: Mapping[str, str] | None = None,
                    trend_window: int = 5) -> list[Recommendation]:
    """The rules, in a fixed order; a rule whose inputs are missing stays silent.

    - ``data_bound``: data wait > :data:`DATA_WAIT_SHARE` of data wait + compute.
    - ``memory_headroom``: peak GPU memory (when GPU totals are given, every GPU), else peak process
      RSS, < :data:`MEMORY_HEADROOM_SHARE` of the total.
    - ``overfitting``: over the last ``trend_window`` epochs ``val_loss`` worsens while ``train_loss``
      improves.
    - ``still_improving``: ``val_loss`` still improving over the last ``trend_window`` epochs.
    - ``early_stopped``: early stopping ended training (the metric stopped improving).
    - ``unstable``: non-finite loss, exploding gradient or loss spike anomalies.
    - ``checkpoint_blocking``: checkpoint blocking time > :data:`CHECKPOINT_BLOCKING_SHARE` of step time.
    """
    out: list[Recommendation] = []
    t = _timing(timing)
    if t is not None and t.get("data_share", 0.0) > DATA_WAIT_SHARE:
        out.append(Recommendation(
            "data_bound",
            f"data wait is {t['data_share']:.0%} of step time (above {DATA_WAIT_SHARE:.0%}): the loop is bound by "
            "data loading",
            "raise DataLoader num_workers and prefetch_factor, pin memory, or preprocess/cache the dataset"))

    if resources:
        res = _normalize_resources(resources)
        gpus = [i for i in _gpu_indices(res) if f"gpu{i}/memory_total_mb" in res and f"gpu{i}/memory_used_mb" in res]
        if gpus:
            shares = {i: res[f"gpu{i}/memory_used_mb"] / res[f"gpu{i}/memory_total_mb"] for i in gpus}
            if all(s < MEMORY_HEADROOM_SHARE for s in shares.values()):
                used = ", ".join(f"GPU {i} {s:.0%}" for i, s in shares.items())
                out.append(Recommendation(
                    "memory_headroom", f"peak GPU memory is below {MEMORY_HEADROOM_SHARE:.0%} of the total ({used})",
                    "memory headroom: a larger batch may fit (scale the learning rate with it)"))
        elif "process_rss_mb" in res and res.get("memory_total_mb"):
            share = res["process_rss_mb"] / res["memory_total_mb"]
            if share < MEMORY_HEADROOM_SHARE:
                out.append(Recommendation(
                    "memory_headroom",
                    f"peak process RSS is {share:.0%} of system memory (below {MEMORY_HEADROOM_SHARE:.0%})",
                    "memory headroom: a larger batch may fit (scale the learning rate with it)"))

    summaries = {s.name: s for s in summarize_metrics(history, modes, trend_window)}
    val, train = summaries.get("val_loss"), summaries.get("train_loss")
    if val is not None and train is not None and val.trend == "worsening" and train.trend == "improving":
        out.append(Recommendation(
            "overfitting",
            f"over the last {trend_window} epochs val_loss rises while train_loss falls "
            f"(best val_loss {val.best:.4g} at epoch {val.best_epoch})",
            "overfitting: add regularization (dropout, weight decay, augmentation) or stop early at the best epoch"))
    elif val is not None and val.trend == "improving":
        out.append(Recommendation(
            "still_improving", f"val_loss was still improving over the last {trend_window} epochs",
            "training may not have converged: more epochs may help"))

    if stop_reason and stop_reason.startswith(EARLY_STOPPING_PREFIX):
        out.append(Recommendation(
            "early_stopped", stop_reason,
            "the final weights are the last epoch's, not the best one's (the best_<metric> milestone checkpoint "
            "holds those); lower the learning rate or decay it on plateau to get further"))
    events = list(anomalies or [])
    kinds = Counter(_field(e, "kind") for e in events)
    unstable = {k: kinds[k] for k in ("nonfinite_loss", "exploding_gradient", "loss_spike") if kinds.get(k)}
    if unstable:
        found = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in unstable.items())
        out.append(Recommendation(
            "unstable", f"training was unstable: {found} event(s)",
            "lower the learning rate or add warmup, clip gradients, and check the inputs for NaN/inf"))

    c = _checkpoints(checkpoints)
    if c is not None and t is not None and c["blocking_s"] > CHECKPOINT_BLOCKING_SHARE * t["wall_s"]:
        out.append(Recommendation(
            "checkpoint_blocking",
            f"checkpoint saves held the loop for {c['blocking_s']:.3g} s, {c['blocking_s'] / t['wall_s']:.0%} of "
            f"step time (above {CHECKPOINT_BLOCKING_SHARE:.0%})",
            "save less often (raise checkpoint.every_steps or every_seconds)"))
    return out


def memory_totals() -> dict[str, float]:
    """``memory_total_mb`` of the host and ``gpu<i>/memory_total_mb`` per GPU NVML can see, for the
    headroom rule. GPUs are left out when NVML is unavailable."""
    import psutil

    totals = {"memory_total_mb": psutil.virtual_memory().total / 1e6}
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML library or no driver: host memory only
        return totals
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            totals[f"gpu{i}/memory_total_mb"] = pynvml.nvmlDeviceGetMemoryInfo(
                pynvml.nvmlDeviceGetHandleByIndex(i)).total / 1e6
    finally:
        pynvml.nvmlShutdown()
    return totals


# --- Markdown --------------------------------------------------------------------------------------


def _num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


_RESOURCE_LABELS = {
    "cpu_percent": ("CPU", "%"), "process_rss_mb": ("process RSS", "MB"),
    "memory_used_percent": ("system memory used", "%"), "disk_read_bytes": ("disk read", "B"),
    "disk_write_bytes": ("disk written", "B"), "net_sent_bytes": ("network sent", "B"),
    "net_recv_bytes": ("network received", "B"), "utilization_percent": ("utilization", "%"),
    "memory_used_mb": ("memory", "MB"), "temperature_c": ("temperature", "°C"), "power_w": ("power", "W"),
}


def _resource_rows(resources: Mapping[str, float]) -> list[list[str]]:
    res = _normalize_resources(resources)
    rows = []
    for key, value in res.items():
        if key.endswith("memory_total_mb"):
            continue
        gpu = re.match(r"gpu(\d+)/(.+)", key)
        base = gpu.group(2) if gpu else key
        label, unit = _RESOURCE_LABELS.get(base, (base, ""))
        label = f"GPU {gpu.group(1)} {label}" if gpu else label
        shown = _bytes(value) if unit == "B" else f"{value:.4g} {unit}".strip()
        total_key = f"gpu{gpu.group(1)}/memory_total_mb" if gpu and base == "memory_used_mb" else \
            "memory_total_mb" if base == "process_rss_mb" else None
        share = ""
        if total_key and res.get(total_key):
            share = f"{value / res[total_key]:.0%} of {res[total_key]:.0f} MB"
        rows.append([label, shown, share])
    return rows


def summary_report(history: Sequence[Mapping[str, Any]] = (), *, resources: Mapping[str, float] | None = None,
                   timing: Any = None, checkpoints: Any = None, anomalies: Iterable[Any] | None = None,
                   stop_reason: str | None = None, modes: Mapping[str, str] | None = None, trend_window: int = 5,
                   title: str = "Training summary") -> str:
    """The run as Markdown: metrics (best with its epoch/step, first, last, trend), resource peaks,
    step timing, checkpoint saves, anomalies, why training stopped early and recommendations. Sections whose input is missing
    or empty are left out; the recommendations section is always there.

    Args:
        modes: Direction per metric name (``"min"``/``"max"``); others follow :func:`ml.metrics.direction`.
        trend_window: Epochs the trend and the epoch rules look back over, >= 2.
    """
    if trend_window < 2:
        raise ValueError(f"trend_window: expected an integer >= 2, got {trend_window!r}")
    events = list(anomalies) if anomalies is not None else None
    lines = [f"# {title}", ""]

    metrics = summarize_metrics(history, modes, trend_window)
    if metrics:
        lines += ["## Metrics", ""]
        lines += _table(["metric", "best", "epoch", "step", "first", "last", f"trend (last {trend_window})"],
                        [[m.name + (" ↓" if m.mode == "min" else " ↑"), _num(m.best), _num(m.best_epoch),
                          _num(m.best_step), _num(m.first), _num(m.last), m.trend] for m in metrics], "lrrrrrl")
        lines.append("")

    resource_rows = _resource_rows(resources or {})
    if resource_rows:
        lines += ["## Resources (peaks)", ""]
        lines += _table(["resource", "peak", "of total"], resource_rows, "lrl")
        lines.append("")

    t = _timing(timing)
    if t is not None:
        lines += ["## Step timing", ""]
        rate = (f"{t['samples_per_s']:.4g} samples/s" if "samples_per_s" in t else f"{t['steps_per_s']:.4g} steps/s")
        rows = [["steps", f"{t['steps']:.0f}"], ["total step time", f"{t['wall_s']:.4g} s"],
                ["mean step time", f"{1000 * t['mean_step_s']:.4g} ms"], ["throughput", rate]]
        if "data_share" in t:
            rows += [["data wait", f"{t['data_s']:.4g} s ({t['data_share']:.0%})"],
                     ["compute", f"{t['compute_s']:.4g} s ({1 - t['data_share']:.0%})"]]
        lines += _table(["", "value"], rows, "lr")
        lines.append("")

    c = _checkpoints(checkpoints)
    if c is not None:
        lines += ["## Checkpoints", ""]
        rows = [["saves", f"{c['saves']:.0f}"], ["blocking (loop held)", f"{c['blocking_s']:.4g} s"],
                ["background", f"{c['background_s']:.4g} s"], ["written", _bytes(c["bytes_written"])]]
        if t is not None:
            rows.append(["blocking share of step time", f"{c['blocking_s'] / t['wall_s']:.1%}"])
        lines += _table(["", "value"], rows, "lr")
        lines.append("")

    if events is not None:
        lines += ["## Anomalies", ""]
        if not events:
            lines += ["None detected.", ""]
        else:
            counts = Counter(_field(e, "kind") for e in events)
            lines += [f"{len(events)} event(s): " + ", ".join(f"{k} {n}" for k, n in counts.items()) + ".", ""]
            lines += _table(["kind", "step", "epoch", "value", "threshold", "message"],
                            [[_field(e, "kind"), _num(_field(e, "step")), _num(_field(e, "epoch")),
                              _num(_field(e, "value")), _num(_field(e, "threshold")), _field(e, "message", "")]
                             for e in events[:MAX_ANOMALY_ROWS]], "lrrrrl")
            if len(events) > MAX_ANOMALY_ROWS:
                lines.append(f"\n… and {len(events) - MAX_ANOMALY_ROWS} more (see the events artifact).")
            lines.append("")

    if stop_reason:
        lines += ["## Stopped early", "", stop_reason, ""]

    lines += ["## Recommendations", ""]
    found = recommendations(history, resources=resources, timing=timing, checkpoints=checkpoints, anomalies=events,
                            stop_reason=stop_reason, modes=modes, trend_window=trend_window)
    if found:
        lines += [f"- **{r.rule}**: {r.finding}. {r.advice[0].upper() + r.advice[1:]}." for r in found]
    else:
        lines.append("- No rule fired on these inputs.")
    return "\n".join(lines) + "\n"
