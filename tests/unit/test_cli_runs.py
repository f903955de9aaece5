"""``mlops runs``: the pure parts (query building, tables, the comparison rows, the figure)."""

from __future__ import annotations

import json

import pytest

from ml.errors import PipelineError
from mlops import cli_runs
from mlops.cli import build_parser

NOW = 1_800_000_000_000


@pytest.mark.parametrize(("since", "back_ms"), [("7d", 7 * 86_400_000), ("12h", 12 * 3_600_000),
                                                 ("30m", 30 * 60_000), (" 1d ", 86_400_000)])
def test_since_reaches_back_by_days_hours_or_minutes(since, back_ms):
    assert cli_runs.since_cutoff_ms(since, NOW) == NOW - back_ms


@pytest.mark.parametrize("since", ["7", "d", "0d", "7w", "-1d", "1.5h", "7 d", "", "7dd"])
def test_since_that_is_not_a_count_and_unit_is_one_line_naming_it(since):
    with pytest.raises(PipelineError) as err:
        cli_runs.since_cutoff_ms(since, NOW)
    message = str(err.value)
    assert message.startswith(f"--since {since}:") and "7d, 12h or 30m" in message and "\n" not in message


@pytest.mark.parametrize(("metric", "order"), [
    ("val_accuracy", "metrics.val_accuracy DESC"), ("val_loss", "metrics.val_loss ASC"),
    ("test_accuracy", "metrics.test_accuracy DESC"), ("latency_ms", "metrics.latency_ms ASC"),
    ("f1", "metrics.f1 DESC"), ("train/loss", "metrics.`train/loss` ASC"),
    ("train/samples_per_s", "metrics.`train/samples_per_s` DESC")])
def test_order_puts_the_best_first_in_the_direction_of_ml_metrics(metric, order):
    assert cli_runs.order_by(metric) == [order]


@pytest.mark.parametrize(("text", "clauses"), [
    ("params.lr < 0.01 and metrics.val_accuracy > 0.9", ["params.lr < 0.01", "metrics.val_accuracy > 0.9"]),
    ("params.lr < 0.01 AND  tags.x = 'a'", ["params.lr < 0.01", "tags.x = 'a'"]),
    ("params.opt = 'sand and sea' and metrics.a > 1", ["params.opt = 'sand and sea'", "metrics.a > 1"]),
    ('tags.note = "rock and roll"', ['tags.note = "rock and roll"']),
    ("metrics.`a and b` > 1 and params.x = 'it''s'", ["metrics.`a and b` > 1", "params.x = 'it''s'"]),
    ("params.brand = 'x'", ["params.brand = 'x'"]),
    ("params.lr < 0.01 and", ["params.lr < 0.01", ""]),
])
def test_a_filter_splits_at_each_and_outside_quotes(text, clauses):
    assert cli_runs.split_and(text) == clauses


@pytest.mark.parametrize(("text", "for_mlflow", "numeric"), [
    ("params.lr < 0.01 and metrics.val_accuracy > 0.9", "metrics.val_accuracy > 0.9",
     [("lr", "<", 0.01, "params.lr < 0.01")]),
    ("metrics.val_accuracy > 0.9", "metrics.val_accuracy > 0.9", []),
    ("params.optimizer = 'adam' and param.batch_size >= 64", "params.optimizer = 'adam'",
     [("batch_size", ">=", 64.0, "param.batch_size >= 64")]),
    ("parameters.`model.dropout` != .5 and params.wd <= 1e-4", "",
     [("model.dropout", "!=", 0.5, "parameters.`model.dropout` != .5"), ("wd", "<=", 1e-4, "params.wd <= 1e-4")]),
    ("PARAMS.epochs = 3", "", [("epochs", "=", 3.0, "PARAMS.epochs = 3")]),
    ("params.lr < '0.01'", "params.lr < '0.01'", []),
    ("", "", []), (None, "", []),
])
def test_numeric_param_comparisons_are_kept_apart_from_what_mlflow_evaluates(text, for_mlflow, numeric):
    assert cli_runs.param_comparisons(text) == (for_mlflow, numeric)


@pytest.mark.parametrize("text", ["params.lr < 0.01 and", "and metrics.a > 1", "metrics.a > 1 and and params.b = 'x'"])
def test_an_and_without_a_clause_is_one_line_naming_the_filter(text):
    with pytest.raises(PipelineError, match=r"^--filter .*: expected a clause on each side of every 'and'$"):
        cli_runs.param_comparisons(text)


@pytest.mark.parametrize(("params", "comparisons", "expected"), [
    ({"lr": "0.001"}, [("lr", "<", 0.01)], True),
    ({"lr": "0.01"}, [("lr", "<", 0.01)], False),
    ({"lr": "0.01"}, [("lr", "<=", 0.01)], True),
    ({"lr": "1e-2"}, [("lr", "=", 0.01)], True),
    ({"lr": "0.001", "bs": "32"}, [("lr", "<", 0.01), ("bs", ">", 32)], False),
    ({"lr": "0.001", "bs": "64"}, [("lr", "<", 0.01), ("bs", ">", 32)], True),
    ({"lr": "adaptive"}, [("lr", "<", 0.01)], False),
    ({}, [("lr", "!=", 0.01)], False),
    ({"lr": "0.5"}, [], True),
])
def test_numeric_param_comparison(params, comparisons, expected):
    comparisons = [cli_runs.ParamComparison(*c, clause=f"params.{c[0]} {c[1]} {c[2]}") for c in comparisons]
    assert cli_runs.params_match(params, comparisons) is expected


def test_search_filter_joins_the_users_clauses_age_and_status():
    assert cli_runs.search_filter(None, None, None) == ""
    assert cli_runs.search_filter("  ", 5, None) == "attributes.start_time >= 5"
    assert (cli_runs.search_filter("metrics.a > 1", 5, "FINISHED")
            == "metrics.a > 1 and attributes.start_time >= 5 and attributes.status = 'FINISHED'")


def test_statuses_are_mlflows_run_statuses():
    from mlflow.entities import RunStatus

    assert set(cli_runs.STATUSES) == {RunStatus.to_string(s) for s in RunStatus.all_status()}


def test_parser_takes_status_in_any_case_and_refuses_a_top_below_one():
    args = build_parser().parse_args(["runs", "leaderboard", "--status", "finished", "--top", "3"])
    assert (args.status, args.top, args.metric, args.format) == ("FINISHED", 3, "val_accuracy", "text")
    for bad in ("0", "-2", "x", "50001"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["runs", "leaderboard", "--top", bad])
    args = build_parser().parse_args(["runs", "compare", "a", "b", "--metric", "val_loss", "--metric", "lr"])
    assert (args.run_ids, args.metric, args.all, args.output) == (["a", "b"], ["val_loss", "lr"], False,
                                                                  cli_runs.DEFAULT_OUTPUT)


def test_text_table_aligns_columns_and_markdown_escapes_pipes():
    text = cli_runs.render_table(["a", "long header"], [["x", 1.23456789], [None, "y"]], "text")
    assert text.splitlines() == ["a  long header", "x  1.23457", "-  y"]
    markdown = cli_runs.render_table(["k", "v"], [["a|b", "line\nbreak"]], "markdown")
    assert markdown.splitlines() == ["| k | v |", "|---|---|", "| a\\|b | line break |"]


def board_record(runs: list[dict]) -> dict:
    return {"query": {"experiments": ["e"], "metric": "val_loss", "direction": "min", "filter": "metrics.x > 1",
                      "order_by": ["metrics.val_loss ASC"], "param_comparisons": ["params.lr < 0.01"], "top": 10},
            "runs": runs}


def board_run(rank: int, lr: str, loss: float) -> dict:
    return {"rank": rank, "run_id": f"{rank:032x}", "run_name": f"r{rank}", "experiment": "e", "status": "FINISHED",
            "start_time": "2026-01-01 00:00:00", "metric": loss, "params": {"lr": lr, "seed": "1"},
            "metrics": {"val_loss": loss}}


def markdown_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    assert set(lines[1]) <= {"|", "-"}
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in [lines[0], *lines[2:]]]


def test_leaderboard_renders_as_json_markdown_and_text_with_the_params_that_vary():
    board = board_record([board_run(1, "0.001", 0.1), board_run(2, "0.005", 0.2)])
    assert json.loads(cli_runs.render_leaderboard(board, "json")) == board
    header, *rows = markdown_rows(cli_runs.render_leaderboard(board, "markdown"))
    assert header == ["rank", "run_id", "run_name", "experiment", "status", "started (UTC)", "val_loss", "params.lr"]
    assert [row[0] for row in rows] == ["1", "2"] and [row[-2:] for row in rows] == [["0.1", "0.001"], ["0.2", "0.005"]]
    text = cli_runs.render_leaderboard(board, "text").splitlines()
    assert text[0].split() == ["rank", "run_id", "run_name", "experiment", "status", "started", "(UTC)", "val_loss",
                               "params.lr"]
    assert len(text) == 3 and "seed" not in text[0]
    assert cli_runs.render_leaderboard(board_record([]), "text") == \
        "no runs match (filter: metrics.x > 1 and params.lr < 0.01)"


def test_comparison_rows_show_what_differs_first_and_the_rest_only_with_all():
    runs = [{"params": {"lr": "0.1", "bs": "64"}, "metrics": {"acc": 0.8, "loss": 0.5, "system/cpu": 10.0}},
            {"params": {"lr": "0.01", "bs": "64", "seed": "3"},
             "metrics": {"acc": 0.9, "loss": 0.5, "system/cpu": 20.0}}]
    differing = cli_runs.comparison_rows(runs, include_all=False)
    assert [(r["key"], r["values"]) for r in differing] == [
        ("params.lr", ["0.1", "0.01"]), ("params.seed", [None, "3"]), ("metrics.acc", [0.8, 0.9])]
    every = cli_runs.comparison_rows(runs, include_all=True)
    assert [r["key"] for r in every] == ["params.lr", "params.seed", "metrics.acc", "metrics.system/cpu",
                                         "params.bs", "metrics.loss"]
    assert [r["differs"] for r in every] == [True] * 4 + [False] * 2
    nan = float("nan")
    same = cli_runs.comparison_rows([{"params": {}, "metrics": {"a": nan}}, {"params": {}, "metrics": {"a": nan}}],
                                    include_all=False)
    assert same == []


def test_comparison_text_names_each_run_and_json_keeps_the_png_path():
    report = {"runs": [{"run_id": "a" * 32, "run_name": "one", "experiment_id": "1", "status": "FINISHED",
                        "start_time": "2026-01-01 00:00:00"},
                       {"run_id": "b" * 32, "run_name": "two", "experiment_id": "1", "status": "FAILED",
                        "start_time": "2026-01-02 00:00:00"}],
              "rows": [{"key": "params.lr", "values": ["0.1", "0.01"], "differs": True},
                       {"key": "params.bs", "values": ["64", "64"], "differs": False}],
              "all": True, "curves": ["val_loss"], "png": "out/c.png"}
    lines = cli_runs.render_comparison(report, "text").splitlines()
    assert lines[0].split() == ["aaaaaaaa", "bbbbbbbb"]
    assert lines[1].split() == ["run_name", "one", "two"] and lines[2].split() == ["status", "FINISHED", "FAILED"]
    assert lines[4].split() == ["params.lr", "0.1", "0.01"] and lines[5].split() == ["params.bs", "(same)", "64", "64"]
    assert lines[-1] == "curves: out/c.png (val_loss)"
    assert json.loads(cli_runs.render_comparison(report, "json")) == report


def test_a_run_given_twice_is_one_line_naming_it_before_the_store_is_asked():
    with pytest.raises(PipelineError, match=r"^run abc: given more than once; expected distinct run ids$"):
        cli_runs.get_runs(None, ["abc", "def", "abc"])


def test_json_has_no_nan_or_infinity():
    assert [cli_runs.json_value(v) for v in (float("nan"), float("inf"), -float("inf"), 0.5, "x")] == \
        ["nan", "inf", "-inf", 0.5, "x"]


def test_curves_figure_has_one_subplot_per_metric_and_one_line_per_run_that_logged_it():
    histories = {"val_loss": {"r1": [(0, 1.0), (1, 0.5), (2, 0.25)], "r2": [(0, 0.9), (1, 0.7)]},
                 "val_accuracy": {"r1": [(2, 0.8)], "r2": [(0, 0.1), (1, 0.2)]},
                 "lr": {"r2": [(0, 0.1), (1, 0.05)]},
                 "extra": {"r1": [(0, 1.0)], "r2": [(0, 2.0)]}}
    fig = cli_runs.curves_figure(histories, {"r1": "one (r1)", "r2": "two (r2)"})
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["val_loss (min)", "val_accuracy (max)", "lr (max)", "extra (max)"]
    assert [len(ax.get_lines()) for ax in axes] == [2, 2, 1, 2]
    loss = axes[0].get_lines()
    assert list(loss[0].get_xdata()) == [0, 1, 2] and list(loss[0].get_ydata()) == [1.0, 0.5, 0.25]
    assert [line.get_label() for line in loss] == ["one (r1)", "two (r2)"]
    colour = {line.get_label(): line.get_color() for ax in axes for line in ax.get_lines()}
    assert all(line.get_color() == colour[line.get_label()] for ax in axes for line in ax.get_lines())
    assert colour["one (r1)"] != colour["two (r2)"]
    assert axes[1].get_lines()[0].get_marker() == "o"  # a single point is drawn, not lost as a zero-length line
