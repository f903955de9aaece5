"""Drift: how far a dataset version's distributions moved from a reference.

Per numeric feature, the population stability index over the reference's bins and a two-sample
Kolmogorov-Smirnov test (scipy); for the label, the PSI of the class shares. The reference is either
the summary a contract keeps (bin edges and shares, and 101 quantiles that stand in for the
reference sample in the KS test, so its p-value is that of a 101-value sample) or a whole table, such
as the champion's training split.

PSI is hand-written (a sum over bins): scipy has no function for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

OK, WARN, FAIL = "ok", "warn", "fail"
LEVELS = (OK, WARN, FAIL)
QUANTILES = np.linspace(0.0, 1.0, 101)
EPS = 1e-4  # share floor: an empty bin on one side would make the PSI infinite


@dataclass(frozen=True)
class DriftThresholds:
    """When a PSI warns or fails, and the KS p-value below which a feature is flagged (warn)."""

    psi_warn: float = 0.1
    psi_fail: float = 0.25
    ks_pvalue: float = 0.01


def _round(values: Sequence[float] | np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in np.asarray(values, dtype=float)]


def reference_statistics(table: pd.DataFrame, labels: pd.Series, classes: Sequence[str], bins: int = 10) -> dict[str, Any]:
    """The summary a contract keeps: per numeric feature equal-width bin edges over its range, the
    share of rows per bin and 101 quantiles; the share of each class."""
    features = {}
    for column in table.columns:
        values = table[column].dropna().to_numpy(dtype=float)
        if not len(values):
            continue
        edges = np.histogram_bin_edges(values, bins=bins)
        features[str(column)] = {"edges": _round(edges), "shares": _round(bin_shares(values, edges)),
                                 "quantiles": _round(np.quantile(values, QUANTILES))}
    counts = labels.value_counts(normalize=True)
    return {"rows": int(len(table)), "features": features,
            "labels": {c: float(f"{counts.get(c, 0.0):.6g}") for c in classes}}


def bin_shares(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Share of ``values`` per bin; values beyond the outer edges count in the outer bins."""
    inner = np.asarray(edges, dtype=float)[1:-1]
    counts = np.bincount(np.searchsorted(inner, values, side="right"), minlength=len(edges) - 1)
    return counts / max(len(values), 1)


def psi(reference: Sequence[float], current: Sequence[float]) -> float:
    """Population stability index of two share vectors over the same bins."""
    ref = np.clip(np.asarray(reference, dtype=float), EPS, None)
    cur = np.clip(np.asarray(current, dtype=float), EPS, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def level(psi_value: float, ks_pvalue: float | None, thresholds: DriftThresholds) -> str:
    if psi_value >= thresholds.psi_fail:
        return FAIL
    if psi_value >= thresholds.psi_warn or (ks_pvalue is not None and ks_pvalue < thresholds.ks_pvalue):
        return WARN
    return OK


def measure_drift(table: pd.DataFrame, labels: pd.Series, reference: dict[str, Any], thresholds: DriftThresholds,
                  *, reference_table: pd.DataFrame | None = None, source: str = "contract") -> dict[str, Any]:
    """Drift of ``table`` (numeric features) and ``labels`` (class names) from ``reference``
    (:func:`reference_statistics`); with ``reference_table`` the KS test uses its full columns.
    ``failed`` and ``warned`` list the features (and ``label``) at those levels, when there are any."""
    from scipy.stats import ks_2samp

    rows = []
    for name, ref in reference["features"].items():
        if name not in table.columns or not pd.api.types.is_numeric_dtype(table[name]):
            continue
        values = table[name].dropna().to_numpy(dtype=float)
        if not len(values):
            continue
        current = bin_shares(values, ref["edges"])
        sample = (reference_table[name].dropna().to_numpy(dtype=float) if reference_table is not None
                  else np.asarray(ref["quantiles"], dtype=float))
        ks = ks_2samp(values, sample)
        value = psi(ref["shares"], current)
        rows.append({"feature": name, "psi": round(value, 6), "ks_statistic": round(float(ks.statistic), 6),
                     "ks_pvalue": float(f"{ks.pvalue:.6g}"), "level": level(value, float(ks.pvalue), thresholds),
                     "reference_shares": ref["shares"], "current_shares": _round(current), "edges": ref["edges"]})
    classes = list(reference["labels"])
    counts = labels.value_counts(normalize=True)
    label_current = [float(counts.get(c, 0.0)) for c in classes]
    label_psi = psi(list(reference["labels"].values()), label_current)
    label = {"psi": round(label_psi, 6), "level": level(label_psi, None, thresholds), "classes": classes,
             "reference_shares": list(reference["labels"].values()), "current_shares": _round(label_current)}
    worst = max([r["level"] for r in rows] + [label["level"]], key=LEVELS.index)
    report = {"reference": source, "level": worst, "rows": int(len(table)), "thresholds": thresholds.__dict__,
              "features": sorted(rows, key=lambda r: -r["psi"]), "label": label}
    for key, at in (("failed", FAIL), ("warned", WARN)):
        names = [r["feature"] for r in rows if r["level"] == at] + (["label"] if label["level"] == at else [])
        if names:  # present only when not empty: `dvc plots` reads the first list of objects, an empty list breaks it
            report[key] = names
    return report


def summary_line(report: dict[str, Any]) -> str:
    """One line: the verdict and the worst features."""
    worst = ", ".join(f"{r['feature']} PSI {r['psi']:.3f}" for r in report["features"][:3])
    return (f"drift {report['level']} against the {report['reference']} reference: label PSI "
            f"{report['label']['psi']:.3f}" + (f"; worst {worst}" if worst else ""))


def plot_drift(report: dict[str, Any], path: str | Path, worst: int = 4) -> Path:
    """Per-feature PSI bars with the thresholds, and the worst features' histograms, reference over current."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ml.io import atomic_write

    rows = report["features"]
    shown = [r for r in rows[:worst]] + [{"feature": "label", **report["label"]}]
    fig = plt.figure(figsize=(12, 4 + 2.6 * ((len(shown) + 2) // 3)))
    grid = fig.add_gridspec(1 + (len(shown) + 2) // 3, 3)
    bars = fig.add_subplot(grid[0, :])
    bars.bar(range(len(rows)), [r["psi"] for r in rows],
             color=[{"ok": "tab:green", "warn": "tab:orange", "fail": "tab:red"}[r["level"]] for r in rows])
    bars.set_xticks(range(len(rows)), [r["feature"] for r in rows], rotation=90, fontsize=6)
    for key, style in (("psi_warn", "--"), ("psi_fail", "-")):
        bars.axhline(report["thresholds"][key], color="grey", linestyle=style, label=key)
    bars.set_ylabel("PSI")
    bars.set_title(f"drift against the {report['reference']} reference: {report['level']}")
    bars.legend(loc="upper right")
    for i, row in enumerate(shown):
        ax = fig.add_subplot(grid[1 + i // 3, i % 3])
        ticks = row.get("classes") or [f"{a:g}" for a in row["edges"][:-1]]
        x = np.arange(len(ticks))
        ax.bar(x - 0.2, row["reference_shares"], width=0.4, label="reference")
        ax.bar(x + 0.2, row["current_shares"], width=0.4, label="current")
        ax.set_xticks(x, ticks, rotation=90, fontsize=6)
        ax.set_title(f"{row['feature']}: PSI {row['psi']:.3f}", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    finally:
        plt.close(fig)
