"""A multi-objective study through the tune stage on the embedded stores: four trials of a tiny MLP
scored by validation accuracy, latency and parameter count; NSGA-II, nothing pruned; the trial that
`tune.select` picks from the study's own Pareto front becomes the trained model; the Pareto front is
plotted under reports/ and on the study run. A rule naming an unknown objective stops
`python -m tasks.tune` with one line before any trial runs."""

import json
import shutil
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from tests.conftest import run_module, small_params, write_params

pytestmark = pytest.mark.slow

STUDY = "pareto"
# Widths whose parameter counts all differ (64 inputs, 10 classes: 64h + h + 10h + 10), so the
# smallest network is always on the front; the rule's bound admits the two smallest.
WIDTHS = [8, 16, 32, 64]
MAX_PARAMS = 64 * 16 + 16 + 16 * 10 + 10
RULE = f"max val_accuracy where param_count <= {MAX_PARAMS}"
OBJECTIVES = ["val_accuracy:max", "latency_ms:min", "param_count:min"]


def study_params(**tune) -> dict:
    params = small_params()
    params["train"].update({"epochs": 2, "hidden_sizes": [16]})
    params["tune"].update({"n_trials": len(WIDTHS), "study_name": STUDY, "objectives": OBJECTIVES, "select": RULE,
                           "pruner": "median", "pruner_startup_trials": 0, "pruner_warmup_epochs": 0,
                           "space": {"lr": {"low": 0.01, "high": 0.03, "log": True},
                                     "hidden_sizes": {"choices": [[w] for w in WIDTHS]}}, **tune})
    return params


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, empty_store):
    """Prepared digits, then the tune stage over one enqueued trial per width."""
    from tasks.prepare import run as prepare
    from tasks.tune import run as tune

    project = tmp_path_factory.mktemp("multiobjective")
    shutil.copyfile(empty_store, project / "mlflow.db")
    write_params(project, study_params())
    study = optuna.create_study(study_name=STUDY, storage=f"sqlite:///{project}/optuna.db",
                                directions=["maximize", "minimize", "minimize"])
    for width in WIDTHS:
        study.enqueue_trial({"lr": 0.02, "hidden_sizes": str(width)})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        prepare("params.yaml")
        summary = tune("params.yaml")
    return project, summary


def load_study(project: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{project}/optuna.db")


def test_the_rule_adopts_its_pick_from_the_studys_pareto_front(tuned):
    project, summary = tuned
    study = load_study(project)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * len(WIDTHS)  # no pruning in a multi-objective study
    assert [t.params["hidden_sizes"] for t in study.trials] == [str(w) for w in WIDTHS]
    params = [t.values[2] for t in study.trials]
    assert params == [64 * w + w + 10 * w + 10 for w in WIDTHS]
    assert all(t.values[1] > 0 for t in study.trials)  # latency_ms, measured
    feasible = [t for t in study.best_trials if t.values[2] <= MAX_PARAMS]
    expected = max(feasible, key=lambda t: (t.values[0], -t.number))
    assert summary["best_trial"] == expected.number
    assert summary["best_values"] == dict(zip(["val_accuracy", "latency_ms", "param_count"], expected.values))
    assert summary["best_value"] == expected.values[0]
    adopted = json.loads((project / "reports" / "train_run.json").read_text())
    assert adopted["run_id"] == expected.user_attrs["mlflow_run_id"] == summary["run_id"]
    assert (project / "models" / "model" / "model.safetensors").read_bytes() == (
        project / "models" / "trials" / STUDY / f"trial-{expected.number:04d}" / "model" / "model.safetensors").read_bytes()


def test_pareto_front_and_plots_are_written_and_logged(tuned):
    project, summary = tuned
    report = project / "reports" / "study"
    plots = json.loads((report / "plots.json").read_text())
    assert "pareto_front.png" in plots["written"] and (report / "pareto_front.png").stat().st_size > 0
    assert {f"{kind}_{name}.png" for kind in ("optimization_history", "parallel_coordinate")
            for name in ("val_accuracy", "latency_ms", "param_count")} <= set(plots["written"])
    assert "intermediate_values" in plots["skipped"]
    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    study_run = client.get_run(summary["study_run_id"])
    assert study_run.data.tags["select_rule"] == RULE
    assert study_run.data.metrics["best_param_count"] == summary["best_values"]["param_count"]
    logged = {Path(a.path).name for a in client.list_artifacts(summary["study_run_id"], "optuna")}
    assert set(plots["written"]) <= logged
    trial_run = client.get_run(summary["run_id"])
    assert {"latency_ms", "param_count"} <= set(trial_run.data.metrics)


def test_a_rule_naming_an_unknown_objective_is_one_line_before_any_trial(tuned, tmp_path):
    project, _ = tuned
    shutil.copytree(project / "data", tmp_path / "data")
    write_params(tmp_path, study_params(select="max accuracy where latency <= 2",
                                        storage=f"sqlite:///{tmp_path}/optuna.db"))
    result = run_module("tasks.tune", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].endswith("tune.select: unknown objective 'accuracy', 'latency' in 'max accuracy where "
                              "latency <= 2'; expected one of tune.objectives: val_accuracy, latency_ms, param_count")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "optuna.db").exists()


def test_no_front_trial_meeting_the_rule_is_one_line_and_the_report_shows_the_front(tuned, tmp_path):
    from types import SimpleNamespace

    from ml.config import load_params
    from ml.errors import PipelineError
    from ml.tune.study import run_study

    project, _ = tuned
    params = load_params(write_params(tmp_path, study_params(select="max val_accuracy where param_count <= 100",
                                                             report_dir=str(tmp_path / "study"))))
    with pytest.raises(PipelineError) as err:  # no trial runs (optimize does nothing): the study as it is
        run_study(load_study(project), SimpleNamespace(params=params), None, optimize=lambda study, ctx: None)
    assert str(err.value).startswith(f"tune.select: no Pareto-optimal trial of study {STUDY} meets max val_accuracy "
                                     "where param_count <= 100 (")
    assert "\n" not in str(err.value)
    assert (tmp_path / "study" / "pareto_front.png").is_file()
