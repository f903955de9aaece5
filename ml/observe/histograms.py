"""Weight and gradient histograms over training, for TensorBoard and for the run's artifacts.

:class:`HistogramHook` is a :class:`ml.train.loop.Callback`: every ``every_steps`` optimizer steps it
reads each parameter and its gradient (still present in ``on_step_end``: :func:`ml.train.step.train_step`
clears gradients before the next backward pass, not after the update) and

- writes one TensorBoard histogram per tensor (tags ``weights/<name>`` and ``gradients/<name>``)
  into ``logdir``, so ``tensorboard --logdir <logdir>`` shows the distributions over time;
- appends one row per tensor to a compact table: step, tensor, kind, numel, min, max, mean, std
  (population), L2 norm, non-finite count, the histogram range and ``bins`` bin counts. NaN and inf
  entries are counted in ``nonfinite`` and left out of every other statistic and of the histogram.

At :meth:`HistogramHook.close` the table is written as ``histograms.parquet`` (or
``histograms.json``) and rendered as ``histograms.png`` (percentile bands per tensor over steps),
both in ``logdir``; with a tracker, every file of ``logdir`` is logged under ``artifact_path``.

Cost: nothing between the marks; at a mark the statistics are computed on detached tensors on their
own device with two host transfers for the whole model, and bins with ``torch.histc``. The table is
kept in memory as arrays, about ``8 * (11 + bins)`` bytes per tensor per record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.io import atomic_write, atomic_write_text
from ml.train.loop import Callback

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ml.train.loop import LoopState
    from ml.train.step import StepOutput
    from ml.tracking.base import Tracker

TABLE_FORMATS = ("parquet", "json")
TABLE_COLUMNS = ("step", "tensor", "kind", "numel", "min", "max", "mean", "std", "norm", "nonfinite",
                 "hist_lo", "hist_hi", "counts")
# Percentile bands of the PNG, outermost first (as TensorBoard's distributions view draws them).
PLOT_PERCENTILES = (0.02, 0.16, 0.5, 0.84, 0.98)


def grad_norm(model: nn.Module | Iterable[torch.Tensor]) -> float | None:
    """The global L2 norm of all gradients (one device sync), or None when no parameter has one.

    Accepts a module or an iterable of parameters. Non-finite gradients give ``inf``/``nan``.
    """
    import torch

    params = model.parameters() if hasattr(model, "parameters") else model
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))


@dataclass(frozen=True)
class _Record:
    """One record, compact: per tensor a row of [finite count, sum, sum of squares, mean, std, norm,
    non-finite count, bin counts...] and a row of [min, max, histogram low, histogram high]."""

    step: int
    keys: tuple[tuple[str, str], ...]
    values: np.ndarray
    bounds: np.ndarray


def _columns(records: list[_Record], bins: int) -> dict[str, Any]:
    """The records as table columns: numpy arrays, lists of str for ``tensor``/``kind`` and an
    ``(rows, bins)`` integer array for ``counts``."""
    if not records:
        values, bounds = np.zeros((0, 7 + bins)), np.zeros((0, 4))
    else:
        values = np.concatenate([r.values for r in records])
        bounds = np.concatenate([r.bounds for r in records])
    return {
        "step": np.concatenate([np.full(len(r.keys), r.step, dtype=np.int64) for r in records])
        if records else np.zeros(0, dtype=np.int64),
        "tensor": [name for r in records for name, _ in r.keys],
        "kind": [kind for r in records for _, kind in r.keys],
        "numel": (values[:, 0] + values[:, 6]).astype(np.int64),
        "min": bounds[:, 0], "max": bounds[:, 1],
        "mean": values[:, 3], "std": values[:, 4], "norm": values[:, 5],
        "nonfinite": values[:, 6].astype(np.int64),
        "hist_lo": bounds[:, 2], "hist_hi": bounds[:, 3],
        "counts": values[:, 7:].astype(np.int64),
    }


def columns_to_rows(columns: dict[str, Any]) -> list[dict[str, Any]]:
    """Table columns (as :meth:`HistogramHook.table` returns them) as one dict per row."""
    lists = {k: (v.tolist() if isinstance(v, np.ndarray) else list(v)) for k, v in columns.items()}
    return [dict(zip(TABLE_COLUMNS, values)) for values in zip(*(lists[k] for k in TABLE_COLUMNS))]


@dataclass(frozen=True)
class HistogramOutputs:
    """Where :meth:`HistogramHook.close` put its files (``table``/``png`` None when nothing was recorded)."""

    logdir: Path
    table: Path | None
    png: Path | None


class HistogramHook(Callback):
    """Weight/gradient histograms every ``every_steps`` steps (see the module docstring).

    Args:
        model: The module whose ``named_parameters()`` are recorded.
        logdir: Directory of the TensorBoard event files, the table and the PNG (created on first use).
        every_steps: Optimizer steps between records, >= 1.
        bins: Bins per histogram, >= 1.
        table_format: ``"parquet"`` or ``"json"`` (a list of row objects).
        tracker: When given, :meth:`close` logs every file of ``logdir`` under ``artifact_path``.
        artifact_path: Artifact directory in the run.
        max_plot_tensors: Tensors drawn in the PNG (the first ones in parameter order); the table has all.
    """

    def __init__(self, model: nn.Module, logdir: str | Path, every_steps: int, *, bins: int = 30,
                 table_format: str = "parquet", tracker: Tracker | None = None,
                 artifact_path: str = "histograms", max_plot_tensors: int = 16) -> None:
        if not isinstance(every_steps, int) or every_steps < 1:
            raise ValueError(f"every_steps: expected an integer >= 1, got {every_steps!r}")
        if not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins: expected an integer >= 1, got {bins!r}")
        if table_format not in TABLE_FORMATS:
            raise ValueError(f"table_format: expected one of {', '.join(TABLE_FORMATS)}, got {table_format!r}")
        if max_plot_tensors < 1:
            raise ValueError(f"max_plot_tensors: expected an integer >= 1, got {max_plot_tensors!r}")
        self.model = model
        self.logdir = Path(logdir)
        self.every_steps = every_steps
        self.bins = bins
        self.table_format = table_format
        self.tracker = tracker
        self.artifact_path = artifact_path
        self.max_plot_tensors = max_plot_tensors
        self._records: list[_Record] = []
        self.last_grad_norm: float | None = None
        self.last_step: int | None = None
        self._writer: Any = None
        self._outputs: HistogramOutputs | None = None

    # --- Callback ----------------------------------------------------------------------------------

    def on_step_end(self, state: LoopState, step: StepOutput) -> None:
        if state.global_step % self.every_steps == 0:
            self.record(state.global_step)

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        if self._writer is not None:
            self._writer.flush()

    # --- recording ---------------------------------------------------------------------------------

    def record(self, step: int) -> None:
        """Records every parameter and gradient now, at ``step``. Called by the hook at each mark."""
        import torch

        tensors: list[tuple[str, str, torch.Tensor]] = []
        for name, param in self.model.named_parameters():
            tensors.append((name, "weights", param.detach()))
            if param.grad is not None:
                tensors.append((name, "gradients", param.grad.detach()))
        if not tensors:
            return
        flats = [t.reshape(-1).float() for _, _, t in tensors]
        # First host transfer: the ranges, which torch.histc needs as Python numbers.
        ranges = torch.stack([torch.stack(torch.aminmax(f)) if f.numel() else f.new_zeros(2)
                              for f in flats]).cpu().tolist()
        bounds: list[tuple[float, float, float, float]] = []
        vectors = []
        for flat, (lo, hi) in zip(flats, ranges):
            nonfinite = flat.new_zeros(())
            if not (math.isfinite(lo) and math.isfinite(hi)):
                # Rare path (a NaN or inf somewhere): statistics over the finite values, plus their count.
                finite = torch.isfinite(flat)
                nonfinite = (~finite).sum().float()
                flat = flat[finite]
                lo, hi = (float(v) for v in torch.aminmax(flat)) if flat.numel() else (0.0, 0.0)
            # A constant tensor gets a unit-wide range around its value, as numpy.histogram does.
            hist_lo, hist_hi = (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi)
            bounds.append((lo, hi, hist_lo, hist_hi))
            squares = (flat * flat).sum()
            empty = flat.new_zeros(())
            vectors.append(torch.cat([
                torch.stack([flat.new_tensor(float(flat.numel())), flat.sum(), squares,
                             flat.mean() if flat.numel() else empty,
                             flat.std(correction=0) if flat.numel() else empty,
                             squares.sqrt(), nonfinite]),
                torch.histc(flat, bins=self.bins, min=hist_lo, max=hist_hi)]))
        # Second host transfer: every statistic of every tensor at once.
        values = torch.stack(vectors).double().cpu().numpy()
        keys = tuple((name, kind) for name, kind, _ in tensors)
        if self._records and self._records[-1].keys == keys:
            keys = self._records[-1].keys  # share one tuple between records of the same model
        record = _Record(int(step), keys, values, np.asarray(bounds, dtype=np.float64))
        self._records.append(record)
        writer = self._summary_writer()
        for (name, kind), (lo, hi, hist_lo, hist_hi), row in zip(keys, bounds, values):
            if row[0]:
                edges = [hist_lo + (hist_hi - hist_lo) * (i + 1) / self.bins for i in range(self.bins)]
                writer.add_histogram_raw(f"{kind}/{name}", min=lo, max=hi, num=int(row[0]), sum=float(row[1]),
                                         sum_squares=float(row[2]), bucket_limits=edges,
                                         bucket_counts=[int(c) for c in row[7:]], global_step=step)
        grad_rows = values[[kind == "gradients" for _, kind in keys]]
        if len(grad_rows):
            # A non-finite gradient makes the global norm non-finite, as get_total_norm would.
            self.last_grad_norm = math.inf if grad_rows[:, 6].any() else float(np.sqrt((grad_rows[:, 5] ** 2).sum()))
        else:
            self.last_grad_norm = None
        self.last_step = int(step)

    def table(self) -> dict[str, Any]:
        """The table so far as columns (see :data:`TABLE_COLUMNS`), one row per step and tensor."""
        return _columns(self._records, self.bins)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The table so far, one dict per step and tensor."""
        return columns_to_rows(self.table())

    def _summary_writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.logdir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.logdir))
        return self._writer

    # --- outputs -----------------------------------------------------------------------------------

    def close(self) -> HistogramOutputs:
        """Flushes the event files, writes the table and the PNG, logs them to the tracker. Idempotent."""
        if self._outputs is not None:
            return self._outputs
        if self._writer is not None:
            self._writer.close()
        table = png = None
        if self._records:
            columns = self.table()
            table = write_table(columns, self.logdir / f"histograms.{self.table_format}", self.table_format)
            png = render_histograms(columns, self.logdir / "histograms.png", self.max_plot_tensors)
        if self.tracker is not None and self.logdir.is_dir():
            for path in sorted(p for p in self.logdir.rglob("*") if p.is_file()):
                relative = path.parent.relative_to(self.logdir).as_posix()
                self.tracker.log_artifact(path, self.artifact_path if relative == "." else
                                          f"{self.artifact_path}/{relative}")
        self._outputs = HistogramOutputs(self.logdir, table, png)
        return self._outputs


def write_table(columns: dict[str, Any], path: str | Path, table_format: str = "parquet") -> Path:
    """Writes table columns as Parquet (``counts`` a fixed-size list column) or as a JSON list of
    row objects, atomically."""
    if table_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        counts = np.asarray(columns["counts"], dtype=np.int64)
        arrays = {k: pa.array(columns[k]) for k in TABLE_COLUMNS if k != "counts"}
        arrays["counts"] = pa.FixedSizeListArray.from_arrays(pa.array(counts.reshape(-1)), counts.shape[1])
        table = pa.table(arrays)
        return atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    if table_format == "json":
        return atomic_write_text(path, json.dumps(columns_to_rows(columns)) + "\n")
    raise ValueError(f"table_format: expected one of {', '.join(TABLE_FORMATS)}, got {table_format!r}")


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Reads a table written by :func:`write_table` back as one dict per row."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return json.loads(path.read_text())


def histogram_percentiles(counts: list[int], lo: float, hi: float,
                          percentiles: tuple[float, ...] = PLOT_PERCENTILES) -> list[float]:
    """Percentiles estimated from equal-width bin counts over ``[lo, hi]`` (linear within a bin)."""
    counts = np.asarray(counts, dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    if cumulative[-1] <= 0:
        return [float("nan")] * len(percentiles)
    edges = np.linspace(lo, hi, len(counts) + 1)
    # Only the edges of non-empty bins, so the mass of a bin spreads over that bin alone.
    occupied = counts > 0
    keep = np.concatenate([occupied, [False]]) | np.concatenate([[False], occupied])
    return [float(v) for v in np.interp(np.asarray(percentiles) * cumulative[-1], cumulative[keep], edges[keep])]


def render_histograms(columns: dict[str, Any], path: str | Path, max_tensors: int = 16) -> Path:
    """A PNG with one row of panels per tensor (weights left, gradients right): percentile bands
    (2-98, 16-84) and the median over steps, estimated from the bin counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tensor, kind = np.asarray(columns["tensor"], dtype=object), np.asarray(columns["kind"], dtype=object)
    names = list(dict.fromkeys(columns["tensor"]))
    shown = names[:max_tensors]
    kinds = [k for k in ("weights", "gradients") if k in set(columns["kind"])]
    fig, axes = plt.subplots(max(len(shown), 1), max(len(kinds), 1),
                             figsize=(5 * max(len(kinds), 1), 1.8 * max(len(shown), 1) + 0.6), dpi=90, squeeze=False)
    for i, name in enumerate(shown):
        for j, k in enumerate(kinds):
            ax = axes[i][j]
            index = np.flatnonzero((tensor == name) & (kind == k))
            if not len(index):
                ax.set_axis_off()
                continue
            index = index[np.argsort(columns["step"][index], kind="stable")]
            steps = columns["step"][index]
            bands = np.array([histogram_percentiles(columns["counts"][r], columns["hist_lo"][r], columns["hist_hi"][r])
                              for r in index]).T
            ax.fill_between(steps, bands[0], bands[4], alpha=0.25, color="tab:blue", linewidth=0)
            ax.fill_between(steps, bands[1], bands[3], alpha=0.45, color="tab:blue", linewidth=0)
            ax.plot(steps, bands[2], color="tab:blue", linewidth=1, marker="." if len(steps) == 1 else None)
            ax.set_title(f"{k}/{name}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(shown) - 1:
                ax.set_xlabel("step", fontsize=7)
    title = "weight and gradient distributions over steps (bands: 2-98 and 16-84 percentiles)"
    if len(names) > len(shown):
        title += f"; {len(shown)} of {len(names)} tensors shown"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(path)
