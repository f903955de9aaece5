"""A study's report: Optuna's matplotlib plots as PNG, the trial table and why any plot is missing.

    written = write_study_report(study, "reports/study", seed=42, objective_names=["val_accuracy", "latency_ms"],
                                 adopted=7)

Every plot comes from :mod:`optuna.visualization.matplotlib`: optimization history, parallel
coordinates, parameter importances (fANOVA, seeded) and intermediate values; a multi-objective study
draws history, parallel coordinates and importances per objective (``<plot>_<objective>.png``) and
its Pareto front (2 or 3 objectives) with the adopted trial marked. A plot that cannot be drawn
(importances before two trials completed, intermediate values of a study that reports none) is
left out and its reason recorded in ``plots.json`` beside the plots. The directory is replaced as a
whole (:func:`ml.io.replace_dir`): a reader never sees a half-written report or a stale plot of an
earlier study. Optuna marks these plots experimental; its warnings go to the log, not the terminal.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ml.io import replace_dir

logger = logging.getLogger(__name__)

MIN_TRIALS_FOR_IMPORTANCES = 2


def write_study_report(study: Any, directory: str | Path, seed: int, objective_names: Sequence[str] | None = None,
                       adopted: int | None = None) -> list[Path]:
    """Writes the report of ``study`` into ``directory`` (replaced whole); returns the files written.

    ``objective_names`` names the study's values in order (default ``value`` / ``value_<i>``);
    ``adopted`` is the trial number marked on a Pareto front.
    """
    import matplotlib

    matplotlib.use("Agg")
    import optuna

    names = list(objective_names) if objective_names else (
        ["value"] if len(study.directions) == 1 else [f"value_{i}" for i in range(len(study.directions))])
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    written: list[str] = []
    skipped: dict[str, str] = {}

    def fill(tmp: Path) -> None:
        study.trials_dataframe().to_csv(tmp / "trials.csv", index=False)
        written.append("trials.csv")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", optuna.exceptions.ExperimentalWarning)
            for name, plot in _figures(study, names, complete, seed, adopted, tmp, skipped):
                if _save(plot, tmp / f"{name}.png", name, skipped):
                    written.append(f"{name}.png")
        if (tmp / "param_importances.json").is_file():
            written.append("param_importances.json")
        for warning in caught:
            logger.info("tune report: %s: %s", warning.category.__name__, warning.message)
        (tmp / "plots.json").write_text(json.dumps({"objectives": names, "written": sorted(written),
                                                    "skipped": skipped}, indent=2) + "\n")
        written.append("plots.json")
        for name, reason in skipped.items():
            logger.info("tune report: no %s plot: %s", name, reason)

    replace_dir(directory, fill)
    return [Path(directory) / name for name in sorted(written)]


def _figures(study: Any, names: list[str], complete: list[Any], seed: int, adopted: int | None, tmp: Path,
             skipped: dict[str, str]) -> list[tuple[str, Callable[[], Any]]]:
    """The plots to draw as (file stem, function returning a matplotlib Axes); importances are
    computed here too (their JSON is written into ``tmp``) so that a failure is recorded once."""
    import optuna
    from optuna.visualization import matplotlib as plots

    multi = len(names) > 1
    figures: list[tuple[str, Callable[[], Any]]] = []
    for i, name in enumerate(names):
        suffix = f"_{name}" if multi else ""
        target = (lambda t, i=i: t.values[i]) if multi else None
        figures.append((f"optimization_history{suffix}",
                        lambda target=target, name=name: plots.plot_optimization_history(
                            study, target=target, target_name=name)))
        figures.append((f"parallel_coordinate{suffix}",
                        lambda target=target, name=name: plots.plot_parallel_coordinate(
                            study, target=target, target_name=name)))
    if multi:
        skipped["intermediate_values"] = "a multi-objective study reports no intermediate values (no pruning)"
        if len(names) in (2, 3):
            figures.append(("pareto_front", lambda: _pareto_front(study, names, adopted)))
        else:
            skipped["pareto_front"] = f"drawn for 2 or 3 objectives, the study has {len(names)}"
    elif not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        skipped["intermediate_values"] = "no trial reported an intermediate value"
    else:
        figures.append(("intermediate_values", lambda: plots.plot_intermediate_values(study)))
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCES:
        skipped["param_importances"] = (f"needs {MIN_TRIALS_FOR_IMPORTANCES} completed trials, "
                                        f"the study has {len(complete)}")
        return figures
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    try:
        importances = {name: optuna.importance.get_param_importances(
            study, evaluator=evaluator, target=(lambda t, i=i: t.values[i]) if multi else None)
            for i, name in enumerate(names)}
    except (ValueError, RuntimeError) as exc:  # e.g. every completed trial drew the same values
        skipped["param_importances"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return figures
    (tmp / "param_importances.json").write_text(
        json.dumps(importances if multi else importances[names[0]], indent=2) + "\n")
    figures.append(("param_importances", lambda: plots.plot_param_importances(
        study, evaluator=evaluator, target_name=names[0]) if not multi else _importances_by_objective(
            study, evaluator, names)))
    return figures


def _importances_by_objective(study: Any, evaluator: Any, names: list[str]) -> Any:
    from optuna.visualization import matplotlib as plots

    ax = plots.plot_param_importances(study, evaluator=evaluator)
    labels = [text.get_text() for text in ax.get_legend().get_texts()] if ax.get_legend() else []
    if len(labels) == len(names):
        ax.legend(ax.get_legend_handles_labels()[0], names)
    return ax


def _pareto_front(study: Any, names: list[str], adopted: int | None) -> Any:
    from optuna.visualization import matplotlib as plots

    ax = plots.plot_pareto_front(study, target_names=names)
    trial = next((t for t in study.best_trials if t.number == adopted), None)
    if trial is not None:  # a 3-objective front is a 3D axes: the marker takes all three values
        ax.scatter(*([v] for v in trial.values), marker="*", s=260, facecolors="none", edgecolors="tab:red",
                   linewidths=1.5, zorder=5, label=f"adopted: trial {adopted}")
        ax.legend(loc="best")
    return ax


def _save(plot: Callable[[], Any], path: Path, name: str, skipped: dict[str, str]) -> bool:
    """Draws one plot into ``path``; a plot Optuna refuses is recorded in ``skipped``."""
    import matplotlib.pyplot as plt

    try:
        ax = plot()
    except (ValueError, RuntimeError) as exc:
        skipped[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return False
    figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return True
