"""``mlops runs leaderboard|compare`` against real runs in a real MLflow store (SQLite in tmp), made
with ``MlflowClient`` the way the pipeline makes them: params, metric histories, start times, statuses."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

from mlops.cli import main
from tests.conftest import run_module

pytestmark = pytest.mark.slow

DAY_MS = 86_400_000
# name: (lr, optimizer, final val_accuracy or None, final val_loss, days ago, status)
RUNS = {
    "a": (0.1, "sgd", 0.80, 0.60, 1, "FINISHED"),
    "b": (0.001, "adam", 0.95, 0.20, 2, "FINISHED"),
    "c": (0.005, "adam", 0.91, 0.25, 3, "FAILED"),
    "d": (0.02, "sgd", 0.85, 0.45, 10, "FINISHED"),
    "e": (0.0005, "adam", 0.88, 0.15, 12, "KILLED"),
    "f": (0.003, "adamw", 0.93, 0.30, 20, "FINISHED"),
    "prep": (None, None, None, None, 1, "FINISHED"),  # a stage run that logs no model metric
}
OTHER_EXPERIMENT_RUN = (0.002, "adam", 0.99, 0.05, 1, "FINISHED")


def log_run(client: MlflowClient, experiment_id: str, name: str, spec: tuple, now_ms: int) -> str:
    lr, optimizer, accuracy, loss, days_ago, status = spec
    start = now_ms - days_ago * DAY_MS
    run = client.create_run(experiment_id, start_time=start, run_name=name, tags={"kind": "train" if lr else "prepare"})
    params = [Param("seed", "7")]
    metrics = []
    if lr is not None:
        params += [Param("lr", str(lr)), Param("optimizer", optimizer)]
        for step in range(4):  # curves that end at the final value
            fraction = (step + 1) / 4
            metrics += [Metric("val_accuracy", accuracy * fraction, start + step, step),
                        Metric("val_loss", loss / fraction, start + step, step),
                        Metric("train/loss", loss / fraction + 0.1, start + step, step),
                        Metric("system/cpu_percent", 50.0 + step, start + step, step)]
        metrics.append(Metric("test_accuracy", accuracy - 0.01, start + 4, 0))
    else:
        metrics.append(Metric("rows", 1797.0, start, 0))
    client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=[RunTag("owner", "ci")])
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status, end_time=start + 60_000)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs-store")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    now = int(time.time() * 1000)
    board = client.create_experiment("board", artifact_location=(root / "artifacts").as_uri())
    other = client.create_experiment("other", artifact_location=(root / "other").as_uri())
    ids = {name: log_run(client, board, name, spec, now) for name, spec in RUNS.items()}
    ids["other"] = log_run(client, other, "other", OTHER_EXPERIMENT_RUN, now)
    return {"uri": uri, "client": client, "board": board, "other": other, "ids": ids, "root": root}


def mlops(store: dict, capsys, *args: str) -> str:
    capsys.readouterr()
    main(["--tracking-uri", store["uri"], "runs", *args])
    return capsys.readouterr().out


def leaderboard(store: dict, capsys, *args: str) -> dict:
    return json.loads(mlops(store, capsys, "leaderboard", "--format", "json", *args))


def names(store: dict, run_ids: list[str]) -> list[str]:
    by_id = {run_id: name for name, run_id in store["ids"].items()}
    return [by_id[run_id] for run_id in run_ids]


def mlflow_search(store: dict, experiment_ids: list[str], filter_string: str, order_by: list[str],
                  metric: str) -> list[str]:
    """MLflow's own answer: the same filter and order, the runs that logged the metric."""
    runs = store["client"].search_runs(experiment_ids, filter_string, ViewType.ACTIVE_ONLY, max_results=1000,
                                       order_by=order_by)
    return [run.info.run_id for run in runs if metric in run.data.metrics]


@pytest.mark.parametrize(("metric", "filter_string", "order"), [
    ("val_accuracy", "", "metrics.val_accuracy DESC"),
    ("val_loss", "", "metrics.val_loss ASC"),
    ("val_accuracy", "metrics.val_accuracy > 0.86", "metrics.val_accuracy DESC"),
    ("val_loss", "params.optimizer = 'adam' and tags.kind = 'train'", "metrics.val_loss ASC"),
    ("train/loss", "params.optimizer LIKE 'adam%'", "metrics.`train/loss` ASC"),
    ("test_accuracy", "attributes.run_name != 'a'", "metrics.test_accuracy DESC"),
])
def test_leaderboard_ranks_as_mlflows_own_search_with_the_same_filter_and_order(store, capsys, metric,
                                                                                 filter_string, order):
    args = ["--experiment", "board", "--metric", metric] + (["--filter", filter_string] if filter_string else [])
    board = leaderboard(store, capsys, *args)
    got = [run["run_id"] for run in board["runs"]]
    assert got == mlflow_search(store, [store["board"]], filter_string, [order], metric)
    assert got and board["query"]["order_by"] == [order]
    values = [run["metric"] for run in board["runs"]]
    assert values == sorted(values, reverse=order.endswith("DESC"))
    assert [run["rank"] for run in board["runs"]] == list(range(1, len(got) + 1))
    assert "prep" not in names(store, got)  # logged no such metric: not ranked


def test_leaderboard_over_every_experiment_unless_one_is_named(store, capsys):
    everything = leaderboard(store, capsys)
    assert names(store, [r["run_id"] for r in everything["runs"]]) == ["other", "b", "f", "c", "e", "d", "a"]
    assert everything["runs"][0]["experiment"] == "other"
    named = leaderboard(store, capsys, "--experiment", "board", "--experiment", store["other"])
    assert named["runs"] == everything["runs"]
    assert names(store, [r["run_id"] for r in leaderboard(store, capsys, "--experiment", "other")["runs"]]) == ["other"]


def test_since_status_and_top_narrow_the_search(store, capsys):
    def ranked(*args: str) -> list[str]:
        return names(store, [r["run_id"] for r in leaderboard(store, capsys, "--experiment", "board", *args)["runs"]])

    assert ranked("--since", "5d") == ["b", "c", "a"]
    assert ranked("--since", "96h") == ["b", "c", "a"]
    assert ranked("--since", "2881m") == ["b", "a"]  # two days and a minute: not c, three days old
    assert ranked("--status", "FINISHED") == ["b", "f", "d", "a"]
    assert ranked("--status", "killed") == ["e"]
    assert ranked("--since", "15d", "--status", "FINISHED") == ["b", "d", "a"]
    assert ranked("--top", "2") == ["b", "f"]
    assert ranked("--metric", "val_loss", "--top", "3") == ["e", "b", "c"]
    board = leaderboard(store, capsys, "--experiment", "board", "--since", "5d", "--status", "FINISHED")
    assert board["query"]["filter"].startswith("attributes.start_time >= ")
    assert board["query"]["filter"].endswith(" and attributes.status = 'FINISHED'")
    assert [r["run_id"] for r in board["runs"]] == mlflow_search(store, [store["board"]], board["query"]["filter"],
                                                                 ["metrics.val_accuracy DESC"], "val_accuracy")


def test_numeric_param_comparisons_are_applied_to_mlflows_ranking(store, capsys):
    def ranked(*args: str) -> list[str]:
        return names(store, [r["run_id"] for r in leaderboard(store, capsys, "--experiment", "board", *args)["runs"]])

    assert ranked("--filter", "params.lr < 0.01 and metrics.val_accuracy > 0.9") == ["b", "f", "c"]
    assert ranked("--filter", "params.lr < 0.01 and metrics.val_accuracy > 0.9", "--top", "2") == ["b", "f"]
    assert ranked("--filter", "params.lr >= 0.005 and params.optimizer = 'sgd'") == ["d", "a"]
    assert ranked("--filter", "params.lr = 1e-3") == ["b"]
    assert ranked("--filter", "params.lr > 1") == []
    board = leaderboard(store, capsys, "--experiment", "board",
                        "--filter", "params.lr < 0.01 and metrics.val_accuracy > 0.9")
    assert board["query"]["filter"] == "metrics.val_accuracy > 0.9"
    assert board["query"]["param_comparisons"] == ["params.lr < 0.01"]


def test_markdown_and_text_formats(store, capsys):
    markdown = mlops(store, capsys, "leaderboard", "--experiment", "board", "--format", "markdown", "--top", "3")
    lines = markdown.strip().splitlines()
    assert lines[1] == "|" + "---|" * lines[0].count(" | ") + "---|"
    assert all(line.startswith("| ") and line.endswith(" |") for line in (lines[0], *lines[2:]))
    rows = [[cell.strip() for cell in line.strip("| ").split(" | ")] for line in (lines[0], *lines[2:])]
    header, *body = rows
    assert header[:7] == ["rank", "run_id", "run_name", "experiment", "status", "started (UTC)", "val_accuracy"]
    assert {"params.lr", "params.optimizer"} <= set(header) and "params.seed" not in header  # seed never varies
    assert [(row[0], row[2], row[6]) for row in body] == [("1", "b", "0.95"), ("2", "f", "0.93"), ("3", "c", "0.91")]
    assert all(len(row) == len(header) for row in body)
    text = mlops(store, capsys, "leaderboard", "--experiment", "board", "--top", "3").splitlines()
    assert len(text) == 4 and text[1].split()[:3] == ["1", store["ids"]["b"], "b"]
    assert mlops(store, capsys, "leaderboard", "--filter", "params.lr > 1").strip() == \
        "no runs match (filter: params.lr > 1)"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"  # written whole
    return struct.unpack(">II", data[16:24])


def expected_png_size(curves: int) -> tuple[int, int]:
    """Figure size in pixels for a number of subplots: three to a row, 5 x 3.4 inches each at 100 dpi."""
    cols = min(3, curves)
    return 500 * cols, round(340 * math.ceil(curves / cols))


def test_compare_prints_both_runs_params_and_metrics_and_writes_one_png_of_their_curves(store, capsys, tmp_path):
    b, d = store["ids"]["b"], store["ids"]["d"]
    output = tmp_path / "out" / "compare.png"
    text = mlops(store, capsys, "compare", b, d, "--output", str(output)).splitlines()
    assert text[0].split() == [b[:8], d[:8]] and text[1].split() == ["run_name", "b", "d"]
    rows = {line.split()[0]: line.split()[1:] for line in text[4:] if line and not line.startswith("curves:")}
    assert rows["params.lr"] == ["0.001", "0.02"] and rows["params.optimizer"] == ["adam", "sgd"]
    assert rows["metrics.val_accuracy"] == ["0.95", "0.85"] and rows["metrics.val_loss"] == ["0.2", "0.45"]
    assert rows["metrics.test_accuracy"] == ["0.94", "0.84"]
    assert "params.seed" not in rows and "metrics.system/cpu_percent" not in rows  # the same / the machine's
    curves = ["test_accuracy", "train/loss", "val_accuracy", "val_loss"]
    assert text[-1] == f"curves: {output} ({', '.join(curves)})"
    assert png_size(output) == expected_png_size(len(curves))
    assert output.stat().st_size > 20_000

    report = json.loads(mlops(store, capsys, "compare", b, d, store["ids"]["f"], "--all", "--format", "json",
                              "--metric", "val_loss", "--metric", "system/cpu_percent", "--output", str(output)))
    assert [run["run_id"] for run in report["runs"]] == [b, d, store["ids"]["f"]]
    assert report["curves"] == ["val_loss", "system/cpu_percent"] and report["png"] == str(output)
    keys = [row["key"] for row in report["rows"]]
    assert keys.index("params.seed") > keys.index("metrics.val_loss")  # what differs comes first
    assert {"params.seed", "metrics.system/cpu_percent"} <= set(keys)
    assert next(row for row in report["rows"] if row["key"] == "params.seed") == \
        {"key": "params.seed", "values": ["7", "7", "7"], "differs": False}
    assert png_size(output) == expected_png_size(2)


def test_compare_with_a_run_that_lacks_a_metric_plots_what_they_share(store, capsys, tmp_path):
    output = tmp_path / "c.png"
    report = json.loads(mlops(store, capsys, "compare", store["ids"]["prep"], store["ids"]["a"], "--format", "json",
                              "--metric", "rows", "--output", str(output)))
    assert report["curves"] == ["rows"] and png_size(output) == expected_png_size(1)
    rows = {row["key"]: row["values"] for row in report["rows"]}
    assert rows["metrics.rows"] == [1797.0, None] and rows["params.lr"] == [None, "0.1"]


def one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    return lines[0]


def cli(store: dict, *args: str, cwd: Path):
    return run_module("mlops.cli", "--tracking-uri", store["uri"], "runs", *args, cwd=cwd, timeout=120)


def test_bad_input_is_one_line_and_writes_nothing(store, tmp_path):
    bad_filter = "params.lr < 0.01 and metrics.val_accuracy >"
    with pytest.raises(MlflowException) as mlflow_says:
        store["client"].search_runs([store["board"]], "metrics.val_accuracy >")
    line = one_error_line(cli(store, "leaderboard", "--filter", bad_filter, cwd=tmp_path))
    assert line == f"error: --filter {bad_filter!r}: {' '.join(mlflow_says.value.message.split())}"

    line = one_error_line(cli(store, "leaderboard", "--filter", "params.lr < 0.01 or params.lr > 0.05", cwd=tmp_path))
    assert line.startswith("error: --filter 'params.lr < 0.01 or params.lr > 0.05': ")

    assert one_error_line(cli(store, "leaderboard", "--since", "1 week", cwd=tmp_path)) == \
        "error: --since 1 week: expected a positive number of days, hours or minutes such as 7d, 12h or 30m"
    assert one_error_line(cli(store, "leaderboard", "--experiment", "nope", cwd=tmp_path)) == \
        "error: --experiment nope: no such experiment; expected one of Default, board, other"

    missing = "0123456789abcdef0123456789abcdef"
    proc = cli(store, "compare", store["ids"]["b"], missing, cwd=tmp_path)
    assert one_error_line(proc) == f"error: run {missing}: no such run in the tracking store"
    proc = cli(store, "compare", store["ids"]["b"], store["ids"]["d"], "--metric", "nope", cwd=tmp_path)
    assert one_error_line(proc).startswith("error: --metric nope: none of the runs logged it; they logged ")
    assert not any(tmp_path.rglob("*.png")) and not (tmp_path / "reports").exists()
