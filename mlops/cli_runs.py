"""``mlops runs``: a leaderboard over MLflow's own run search, and runs side by side.

    mlops runs leaderboard [--experiment E]... [--metric M] [--filter F] [--since 7d] [--status S]
                           [--top N] [--format text|json|markdown]
    mlops runs compare RUN RUN... [--all] [--metric M]... [--output PNG] [--format text|json|markdown]

The leaderboard is ``MlflowClient.search_runs``: ``--filter`` (MLflow's search syntax), ``--since``
and ``--status`` become one filter string, ``--metric`` the order (its direction from
:func:`ml.metrics.direction`) and ``--top`` the page size, so MLflow filters and ranks. MLflow
stores params as strings and compares them only with ``=``, ``!=``, ``LIKE`` and ``ILIKE``; a clause
that compares a param with a number (``params.lr < 0.01``) is therefore applied here, to the runs
MLflow returns in its order, and the rest of the filter is still MLflow's. ``compare`` reads each
run's params and final metrics and the metric histories (``MlflowClient.get_metric_history``) and
draws the curves of all runs into one PNG.

The tables are written here: none of the project's dependencies writes both an aligned text table
and a Markdown one, and each is a few lines. Both commands stay in one module (over 400 lines)
because they share the run records, the renderers and the MLflow error handling.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import operator
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ml.errors import PipelineError
from ml.metrics import direction

FORMATS = ("text", "json", "markdown")
# MLflow's run statuses (mlflow.entities.RunStatus), spelled here so `mlops --help` needs no mlflow import.
STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
DEFAULT_METRIC = "val_accuracy"
DEFAULT_OUTPUT = "reports/runs-compare.png"
# Machine measurements (ml.tracking.system), not results of the model: left out of a comparison
# unless asked for (--all for the table, --metric for the curves).
SYSTEM_PREFIX = "system/"
_SINCE = re.compile(r"^(\d+)([dhm])$")
_SINCE_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000}
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.]+$")
# A param compared with an unquoted number, under any of MLflow's spellings of "params".
_PARAM_NUMBER = re.compile(r"^(?:params?|parameters?)\.(`[^`]+`|\"[^\"]+\"|[\w.]+)\s*(<=|>=|!=|<|>|=)\s*"
                           r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$", re.IGNORECASE)
_COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "=": operator.eq,
            "!=": operator.ne}
# MLflow's error codes for a request it cannot parse and for a run that is not there.
_BAD_REQUEST = "INVALID_PARAMETER_VALUE"
_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


# ---------------------------------------------------------------- query building (pure)

def since_cutoff_ms(since: str, now_ms: int) -> int:
    """The start time (ms since the epoch) a ``--since`` like ``7d``, ``12h`` or ``30m`` reaches back to."""
    match = _SINCE.match(since.strip())
    if not match or int(match.group(1)) == 0:
        raise PipelineError(f"--since {since}: expected a positive number of days, hours or minutes "
                            "such as 7d, 12h or 30m")
    return now_ms - int(match.group(1)) * _SINCE_MS[match.group(2)]


def metric_identifier(metric: str) -> str:
    """``metrics.<name>`` as MLflow's search syntax reads it; backquoted when the name has a ``/`` etc."""
    return f"metrics.{metric}" if _PLAIN_KEY.match(metric) else f"metrics.`{metric}`"


def split_and(filter_string: str) -> list[str]:
    """The clauses of a filter at each ``and`` (any case) that is not inside quotes or backquotes."""
    parts, start, quote = [], 0, None
    for match in re.finditer(r"['\"`]|(?<!\S)and(?!\S)", filter_string, re.IGNORECASE):
        token = match.group()
        if len(token) == 1:
            quote = token if quote is None else (None if token == quote else quote)
        elif quote is None:
            parts.append(filter_string[start:match.start()].strip())
            start = match.end()
    parts.append(filter_string[start:].strip())
    return parts


class ParamComparison(NamedTuple):
    """A clause MLflow cannot evaluate: a param compared with a number (``params.lr < 0.01``)."""

    name: str
    op: str
    number: float
    clause: str


def param_comparisons(user_filter: str | None) -> tuple[str, list[ParamComparison]]:
    """Splits ``user_filter`` into what MLflow can evaluate and the numeric param comparisons it cannot."""
    if not user_filter or not user_filter.strip():
        return "", []
    kept, numeric = [], []
    for clause in split_and(user_filter):
        if not clause:
            raise PipelineError(f"--filter {user_filter!r}: expected a clause on each side of every 'and'")
        match = _PARAM_NUMBER.match(clause)
        if match:
            numeric.append(ParamComparison(match.group(1).strip('`"'), match.group(2), float(match.group(3)), clause))
        else:
            kept.append(clause)
    return " and ".join(kept), numeric


def params_match(params: Mapping[str, str], comparisons: Sequence[ParamComparison]) -> bool:
    """Whether every comparison holds; a param that is missing or not a number matches none."""
    for name, op, number, _ in comparisons:
        try:
            value = float(params[name])
        except (KeyError, ValueError):
            return False
        if not _COMPARE[op](value, number):
            return False
    return True


def search_filter(user_filter: str | None, since_ms: int | None, status: str | None) -> str:
    """One MLflow filter string: the user's clauses, a start-time bound and a status, joined by ``and``."""
    clauses = [user_filter.strip()] if user_filter and user_filter.strip() else []
    if since_ms is not None:
        clauses.append(f"attributes.start_time >= {since_ms}")
    if status is not None:
        clauses.append(f"attributes.status = '{status}'")
    return " and ".join(clauses)


def order_by(metric: str) -> list[str]:
    """Best first: ascending for a metric that improves downwards (``ml.metrics.direction``)."""
    return [f"{metric_identifier(metric)} {'ASC' if direction(metric) == 'min' else 'DESC'}"]


def one_line(message: object) -> str:
    return " ".join(str(message).split())


# ---------------------------------------------------------------- formatting (pure)

def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def json_value(value: Any) -> Any:
    """JSON has no NaN or infinity: such a metric becomes the string ``"nan"``, ``"inf"`` or ``"-inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def format_time(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def render_table(header: Sequence[str], rows: Iterable[Sequence[Any]], fmt: str) -> str:
    """Aligned plain-text columns, or a Markdown pipe table (``|`` in a cell escaped)."""
    cells = [[format_value(v) for v in row] for row in rows]
    if fmt == "markdown":
        def line(values: Sequence[str]) -> str:
            return "| " + " | ".join(v.replace("|", "\\|").replace("\n", " ") for v in values) + " |"
        return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, cells)])
    widths = [max(len(v) for v in column) for column in zip(header, *cells)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [list(header), *cells])


def varying_params(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Param names whose value is not the same in every run (a missing param counts as a value)."""
    names = sorted({name for run in runs for name in run["params"]})
    return [name for name in names if len({run["params"].get(name) for run in runs}) > 1]


def render_leaderboard(board: Mapping[str, Any], fmt: str, max_params: int = 8) -> str:
    """``board`` as :func:`leaderboard_record` builds it; text and Markdown show the params that vary."""
    if fmt == "json":
        return json.dumps(board, indent=2)
    runs, metric = board["runs"], board["query"]["metric"]
    if not runs:
        numeric = " and ".join(board["query"]["param_comparisons"])
        return f"no runs match (filter: {' and '.join(filter(None, [board['query']['filter'], numeric])) or 'none'})"
    params = varying_params(runs)[:max_params]
    header = ["rank", "run_id", "run_name", "experiment", "status", "started (UTC)", metric,
              *(f"params.{p}" for p in params)]
    rows = [[run["rank"], run["run_id"], run["run_name"], run["experiment"], run["status"], run["start_time"],
             run["metric"], *(run["params"].get(p) for p in params)] for run in runs]
    return render_table(header, rows, fmt)


def comparison_rows(runs: Sequence[Mapping[str, Any]], include_all: bool) -> list[dict[str, Any]]:
    """Param and final-metric rows across ``runs`` (each ``{"params": {...}, "metrics": {...}}``),
    the rows that differ first. Without ``include_all`` only the differing ones, ``system/`` metrics left out."""
    rows = []
    for kind in ("params", "metrics"):
        for key in sorted({key for run in runs for key in run[kind]}):
            if kind == "metrics" and key.startswith(SYSTEM_PREFIX) and not include_all:
                continue
            values = [run[kind].get(key) for run in runs]
            differs = len({repr(v) for v in values}) > 1  # repr: a NaN equals a NaN here
            if differs or include_all:
                rows.append({"key": f"{kind}.{key}", "values": values, "differs": differs})
    return sorted(rows, key=lambda row: not row["differs"])  # stable: params before metrics within each group


def render_comparison(report: Mapping[str, Any], fmt: str) -> str:
    """``report`` as :func:`comparison_record` builds it."""
    if fmt == "json":
        return json.dumps(report, indent=2)
    runs = report["runs"]
    header = ["", *(run["run_id"][:8] for run in runs)]
    rows = [["run_name", *(run["run_name"] for run in runs)], ["status", *(run["status"] for run in runs)],
            ["started (UTC)", *(run["start_time"] for run in runs)]]
    rows += [[row["key"] + ("" if row["differs"] else " (same)"), *row["values"]] for row in report["rows"]]
    table = render_table(header, rows, fmt)
    if not any(row["differs"] for row in report["rows"]):
        table += "\n\nno param or metric differs" + ("" if report["all"] else " (--all shows them)")
    return f"{table}\n\ncurves: {report['png']} ({', '.join(report['curves'])})"


def curves_figure(histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
                  labels: Mapping[str, str]) -> Any:
    """One subplot per metric key (``histories[key][run_id]`` = ``[(step, value), ...]``), one line per
    run in the same colour on every subplot, drawn on matplotlib's Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = list(histories)
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(5 * cols, 3.4 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    colours = {run_id: f"C{i % 10}" for i, run_id in enumerate(labels)}
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for run_id, points in histories[key].items():
            steps, values = zip(*points) if points else ((), ())
            ax.plot(steps, values, label=labels[run_id], color=colours[run_id],
                    marker="o" if len(points) == 1 else None, linewidth=1.2)
        ax.set_title(f"{key} ({direction(key)})", fontsize="medium")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


# ---------------------------------------------------------------- MLflow reads

def resolve_experiments(client: Any, names: Sequence[str] | None) -> dict[str, str]:
    """Experiment id -> name for each ``--experiment`` (a name, or an id); every active one when none given."""
    if not names:
        found, token = {}, None
        while True:
            page = client.search_experiments(page_token=token)
            found.update({e.experiment_id: e.name for e in page})
            token = page.token
            if not token:
                return found
    from mlflow.exceptions import MlflowException

    found = {}
    for name in names:
        experiment = client.get_experiment_by_name(name)
        if experiment is None and name.isdigit():
            try:
                experiment = client.get_experiment(name)
            except MlflowException:
                experiment = None
        if experiment is None:
            known = sorted(e.name for e in client.search_experiments())
            raise PipelineError(f"--experiment {name}: no such experiment; expected one of "
                                f"{', '.join(known) or '(none)'}")
        found[experiment.experiment_id] = experiment.name
    return found


def run_record(run: Any, experiments: Mapping[str, str] | None = None) -> dict[str, Any]:
    info = run.info
    return {"run_id": info.run_id, "run_name": info.run_name, "experiment_id": info.experiment_id,
            "experiment": (experiments or {}).get(info.experiment_id, info.experiment_id), "status": info.status,
            "start_time": format_time(info.start_time), "end_time": format_time(info.end_time),
            "params": dict(sorted(run.data.params.items())),
            "metrics": {k: json_value(v) for k, v in sorted(run.data.metrics.items())}}


def leaderboard_record(client: Any, experiments: Mapping[str, str], metric: str, user_filter: str | None,
                       since_ms: int | None, status: str | None, top: int) -> dict[str, Any]:
    """The best ``top`` runs by ``metric`` that match the filter, in the order MLflow's search ranks them.

    Runs that never logged ``metric`` are not ranked; MLflow orders them after every run that did, so
    the list ends at the first of them. With numeric param comparisons (see :func:`param_comparisons`)
    the search pages on until ``top`` runs pass them."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking import SEARCH_MAX_RESULTS_DEFAULT

    mlflow_filter, numeric = param_comparisons(user_filter)
    filter_string = search_filter(mlflow_filter, since_ms, status)
    order = order_by(metric)
    ranked: list[dict[str, Any]] = []
    token = None
    while len(ranked) < top:
        try:
            page = client.search_runs(list(experiments), filter_string=filter_string,
                                      run_view_type=ViewType.ACTIVE_ONLY, order_by=order, page_token=token,
                                      max_results=max(top, SEARCH_MAX_RESULTS_DEFAULT) if numeric else top)
        except MlflowException as exc:
            if exc.error_code != _BAD_REQUEST:
                raise
            raise PipelineError(f"--filter {user_filter or filter_string!r}: {one_line(exc.message)}") from None
        for run in page:
            if metric not in run.data.metrics:
                token = None
                break
            if params_match(run.data.params, numeric):
                ranked.append({"rank": len(ranked) + 1, **run_record(run, experiments),
                               "metric": json_value(run.data.metrics[metric])})
                if len(ranked) == top:
                    break
        else:
            token = page.token
        if not token or not numeric:
            break
    return {"query": {"experiments": sorted(experiments.values()), "metric": metric,
                      "direction": direction(metric), "filter": filter_string, "order_by": order,
                      "param_comparisons": [c.clause for c in numeric], "top": top},
            "runs": ranked[:top]}


def get_runs(client: Any, run_ids: Sequence[str]) -> list[Any]:
    from mlflow.exceptions import MlflowException

    seen = [rid for i, rid in enumerate(run_ids) if rid in run_ids[:i]]
    if seen:
        raise PipelineError(f"run {seen[0]}: given more than once; expected distinct run ids")
    runs = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except MlflowException as exc:
            if exc.error_code not in (_NOT_FOUND, _BAD_REQUEST):
                raise
            raise PipelineError(f"run {run_id}: no such run in the tracking store") from None
    return runs


def curve_keys(runs: Sequence[Any], chosen: Sequence[str] | None) -> list[str]:
    """``--metric`` names (each logged by at least one run), else every key all runs logged, ``system/`` aside."""
    logged = [set(run.data.metrics) for run in runs]
    if chosen:
        for key in chosen:
            if not any(key in keys for keys in logged):
                raise PipelineError(f"--metric {key}: none of the runs logged it; they logged "
                                    f"{', '.join(sorted(set().union(*logged))) or 'no metrics'}")
        return list(dict.fromkeys(chosen))
    common = sorted(k for k in set.intersection(*logged) if not k.startswith(SYSTEM_PREFIX))
    if not common:
        raise PipelineError(f"runs {', '.join(r.info.run_id for r in runs)}: no metric logged by all of them; "
                            "name the curves with --metric")
    return common


Curves = dict[str, dict[str, list[tuple[int, float]]]]


def metric_histories(client: Any, runs: Sequence[Any], keys: Sequence[str]) -> Curves:
    """``{key: {run_id: [(step, value), ...]}}`` in step order, for the runs that logged each key."""
    histories: Curves = {}
    for key in keys:
        histories[key] = {}
        for run in runs:
            if key in run.data.metrics:
                points = client.get_metric_history(run.info.run_id, key)
                histories[key][run.info.run_id] = [(m.step, m.value) for m in
                                                   sorted(points, key=lambda m: (m.step, m.timestamp))]
    return histories


def comparison_record(client: Any, run_ids: Sequence[str], metrics: Sequence[str] | None, include_all: bool,
                      output: Path) -> dict[str, Any]:
    """Reads the runs, writes the PNG of their curves to ``output`` (whole or not at all), returns the report."""
    from ml.io import atomic_write

    if output.suffix.lower() != ".png" or output.is_dir():
        raise PipelineError(f"--output {output}: expected a .png file path")
    runs = get_runs(client, run_ids)
    keys = curve_keys(runs, metrics)
    labels = {run.info.run_id: f"{run.info.run_name or 'run'} ({run.info.run_id[:8]})" for run in runs}
    fig = curves_figure(metric_histories(client, runs, keys), labels)
    atomic_write(output, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    records = [run_record(run) for run in runs]
    return {"runs": [{k: r[k] for k in ("run_id", "run_name", "experiment_id", "status", "start_time")}
                     for r in records],
            "rows": [{**row, "values": [json_value(v) for v in row["values"]]}
                     for row in comparison_rows(records, include_all)],
            "all": include_all, "curves": keys, "png": str(output)}


# ---------------------------------------------------------------- command line

def cmd_leaderboard(args: argparse.Namespace) -> None:
    from mlops.cli import client_for

    since_ms = since_cutoff_ms(args.since, int(time.time() * 1000)) if args.since else None
    client = client_for(args)
    board = leaderboard_record(client, resolve_experiments(client, args.experiment), args.metric, args.filter,
                               since_ms, args.status, args.top)
    print(render_leaderboard(board, args.format))


def cmd_compare(args: argparse.Namespace) -> None:
    from mlops.cli import client_for

    if len(args.run_ids) < 2:
        raise PipelineError(f"runs compare {' '.join(args.run_ids)}: expected at least two run ids")
    report = comparison_record(client_for(args), args.run_ids, args.metric, args.all, Path(args.output))
    print(render_comparison(report, args.format))


def _top(value: str) -> int:
    from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD

    if not value.isdigit() or not 1 <= int(value) <= SEARCH_MAX_RESULTS_THRESHOLD:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {SEARCH_MAX_RESULTS_THRESHOLD}, "
                                         f"got {value!r}")
    return int(value)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("runs", help="rank runs with MLflow's search, compare runs side by side",
                                   description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="action", required=True)

    board = actions.add_parser("leaderboard", help="the best runs by a metric, filtered by MLflow's search syntax")
    board.add_argument("--experiment", action="append", metavar="NAME",
                       help="experiment name or id, repeatable (default: every active experiment)")
    board.add_argument("--metric", default=DEFAULT_METRIC,
                       help=f"rank by this metric's last value, best first (default: {DEFAULT_METRIC}); "
                            "its direction comes from ml/metrics.py")
    board.add_argument("--filter", metavar="EXPR",
                       help="MLflow search filter, e.g. \"params.lr < 0.01 and metrics.val_accuracy > 0.9\"")
    board.add_argument("--since", metavar="AGE", help="runs started within this age: 7d, 12h, 30m")
    board.add_argument("--status", type=str.upper, choices=STATUSES, help="only runs with this status")
    board.add_argument("--top", type=_top, default=10, metavar="N", help="how many runs (default: 10)")
    board.add_argument("--format", choices=FORMATS, default="text")
    board.set_defaults(func=cmd_leaderboard)

    compare = actions.add_parser("compare", help="params and final metrics side by side, curves in one PNG")
    compare.add_argument("run_ids", nargs="+", metavar="RUN", help="two or more run ids")
    compare.add_argument("--all", action="store_true",
                         help="every param and metric, not only those that differ (system/ metrics included)")
    compare.add_argument("--metric", action="append", metavar="KEY",
                         help="a metric to plot, repeatable (default: every metric all runs logged, system/ aside)")
    compare.add_argument("--output", default=DEFAULT_OUTPUT, metavar="PNG",
                         help=f"where the curves go (default: {DEFAULT_OUTPUT})")
    compare.add_argument("--format", choices=FORMATS, default="text")
    compare.set_defaults(func=cmd_compare)
