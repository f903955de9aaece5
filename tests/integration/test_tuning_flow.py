"""The tuning pipeline as a Prefect flow on the embedded stores: a tiny Optuna study whose trials are
MLflow runs nested in the study run, itself nested in the pipeline run; the best trial is evaluated and
registered, lineage reaches it, and a second invocation resumes the study."""

import json
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from flows.tuning import tuning_pipeline
from tests.conftest import small_params, write_params

pytestmark = pytest.mark.slow

TRAIN_RUN_FILE_KEYS = {"run_id", "model_uri", "experiment", "run_url", "parent_run_id", "dataset", "git", "resume",
                       "stopped_early", "final"}


# The three trials, enqueued in the study before the flow runs: two sensible ones, then one whose
# learning rate cannot move the weights in an epoch. Pruning starts once two trials have completed,
# so the third, at chance accuracy after its first epoch, is pruned there by the median rule.
ABSURD_LR = 1e-6
TRIALS = [{"lr": 0.03, "batch_size": 64, "hidden_sizes": "16"},
          {"lr": 0.01, "batch_size": 128, "hidden_sizes": "16"},
          {"lr": ABSURD_LR, "batch_size": 64, "hidden_sizes": "16"}]


def tiny_study() -> dict:
    """3 trials of 2 epochs of a 16-unit MLP; pruning may start at the first epoch of the third trial."""
    params = small_params()
    params["train"].update({"epochs": 2, "hidden_sizes": [16]})
    params["tune"].update({"n_trials": 3, "pruner_startup_trials": 2, "pruner_warmup_epochs": 0, "study_name": "tiny",
                           "space": {"lr": {"low": ABSURD_LR, "high": 0.03, "log": True},
                                     "batch_size": {"choices": [64, 128]}, "hidden_sizes": {"choices": [[16]]}}})
    return params


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, prefect_harness):
    project = tmp_path_factory.mktemp("project")
    write_params(project, tiny_study())
    study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{project}/optuna.db", direction="maximize")
    for trial in TRIALS:
        study.enqueue_trial(trial)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        state = tuning_pipeline(params_path="params.yaml", return_state=True)
        yield project, state


def client_of(project: Path) -> MlflowClient:
    uri = f"sqlite:///{project}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def study_of(project: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{project}/optuna.db")


def runs_of_kind(client: MlflowClient, kind: str) -> list:
    experiment = client.get_experiment_by_name("mlops-pipeline")
    return client.search_runs([experiment.experiment_id], f"tags.`mlops.run_kind` = '{kind}'",
                              order_by=["attributes.start_time ASC"])


def test_trials_are_runs_nested_in_the_study_run_nested_in_the_pipeline_run(tuned):
    project, state = tuned
    assert state.is_completed(), state
    client = client_of(project)
    (pipeline,) = runs_of_kind(client, "pipeline")
    (study_run,) = runs_of_kind(client, "tuning")
    trial_runs = runs_of_kind(client, "trial")
    assert study_run.data.tags["mlflow.parentRunId"] == pipeline.info.run_id
    assert study_run.data.tags["optuna_study"] == "tiny"
    assert study_run.data.tags["prefect_flow_run_id"] == str(state.state_details.flow_run_id)
    assert sorted(int(r.data.tags["optuna_trial"]) for r in trial_runs) == [0, 1, 2]
    by_number = {int(r.data.tags["optuna_trial"]): r for r in trial_runs}
    trials = study_of(project).trials
    assert len(trials) == 3
    experiment_id = pipeline.info.experiment_id
    for trial in trials:
        run = by_number[trial.number]
        tags = run.data.tags
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert tags["mlflow.parentRunId"] == study_run.info.run_id and tags["optuna_study"] == "tiny"
        assert tags["mlflow.runName"].startswith(f"trial-{trial.number}-lr") and run.info.status == "FINISHED"
        assert tags["optuna_state"] == trial.state.name and tags["dataset_md5"].endswith(".dir")
        assert float(run.data.params["train.lr"]) == trial.params["lr"]
        assert run.data.metrics["val_accuracy"] == trial.intermediate_values[max(trial.intermediate_values)]
        models = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
        directory = project / "models" / "trials" / "tiny" / f"trial-{trial.number:04d}"
        if trial.state == optuna.trial.TrialState.COMPLETE:
            # its MLflow model only when no trial completed before it was better (trial 0 always)
            led = all(trial.value >= t.value for t in trials[:trial.number] if t.state.name == "COMPLETE")
            assert len(models) == int(led) and tags["model_logged"] == str(led).lower()
            assert (directory / "model" / "model.safetensors").is_file()
            assert json.loads((directory / "run.json").read_text())["run_id"] == run.info.run_id
        else:
            assert trial.state == optuna.trial.TrialState.PRUNED
            assert len(models) == 0 and not (directory / "model").exists()
    assert [t.params for t in trials] == TRIALS
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert sorted(trials[2].intermediate_values) == [1]  # pruned after its first epoch


def test_study_run_records_the_best_trial_and_optunas_plots(tuned):
    project, _ = tuned
    client = client_of(project)
    (study_run,) = runs_of_kind(client, "tuning")
    best = study_of(project).best_trial
    tags, params = study_run.data.tags, study_run.data.params
    assert tags["best_trial_number"] == str(best.number)
    assert tags["best_trial_run_id"] == best.user_attrs["mlflow_run_id"]
    assert float(tags["best_value"]) == pytest.approx(best.value, rel=1e-5)
    assert float(params["best.lr"]) == best.params["lr"] and params["best.hidden_sizes"] == "[16]"
    assert study_run.data.metrics["trials_complete"] == 2 and study_run.data.metrics["trials_pruned"] == 1
    artifacts = {a.path for a in client.list_artifacts(study_run.info.run_id, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/intermediate_values.png", "optuna/param_importances.png",
            "optuna/trials.csv"} <= artifacts


def test_best_trial_is_evaluated_and_registered_and_lineage_reaches_it(tuned):
    from lineage.graph import lineage_of_model_version

    project, state = tuned
    registered = state.result()
    assert registered["status"] == "PendingManualApproval" and registered["version"] == "1"
    client = client_of(project)
    best = study_of(project).best_trial
    best_run_id = best.user_attrs["mlflow_run_id"]
    (study_run,) = runs_of_kind(client, "tuning")
    trained = json.loads((project / "reports" / "train_run.json").read_text())
    assert set(trained) == TRAIN_RUN_FILE_KEYS
    assert trained["run_id"] == best_run_id and trained["parent_run_id"] == study_run.info.run_id
    assert trained["final"]["val_accuracy"] == best.value and trained["model_uri"].startswith("models:/")
    trial_weights = project / "models" / "trials" / "tiny" / f"trial-{best.number:04d}" / "model" / "model.safetensors"
    assert (project / "models" / "model" / "model.safetensors").read_bytes() == trial_weights.read_bytes()
    version = client.get_model_version("digits-classifier", "1")
    assert version.run_id == best_run_id
    best_run = client.get_run(best_run_id)
    assert best_run.data.tags["optuna_trial"] == str(best.number) and "test_accuracy" in best_run.data.metrics
    graph = lineage_of_model_version(client, project / "deployments", "digits-classifier", "1")
    kinds = [n.attrs.get("run_kind") for n in graph.of_kind("run")]
    assert kinds == ["trial", "tuning", "pipeline"]
    assert graph.nodes[f"run:{best_run_id}"].attrs["optuna_trial"] == str(best.number)
    assert not [n for n in graph.nodes.values() if n.missing]


def test_the_best_trial_of_another_machine_is_fetched_from_the_mlflow_store(tuned, tmp_path):
    from ml.config import load_params
    from ml.tune.study import RUN_ID_ATTR, SUMMARY_ATTR, StudyOutcome, adopt_best_trial

    project, _ = tuned
    params = load_params(str(project / "params.yaml"))
    best = study_of(project).best_trial
    elsewhere = tmp_path / "other-machine"  # no trial directories here: everything comes from the trial's run
    tune = params.tune.model_copy(update={"trials_dir": str(elsewhere / "trials")})
    train = params.train.model_copy(update={"model_dir": str(elsewhere / "model"),
                                            "run_file": str(elsewhere / "run.json"),
                                            "metrics_file": str(elsewhere / "metrics.json")})
    outcome = StudyOutcome("tiny", best.number, best.value, best.params, best.user_attrs[RUN_ID_ATTR],
                           dict(best.user_attrs[SUMMARY_ATTR]), [], {})
    summary = adopt_best_trial(outcome, train, tune, client_of(project))
    here = project / "models" / "trials" / "tiny" / f"trial-{best.number:04d}"
    assert sorted(p.name for p in (elsewhere / "model").iterdir()) == sorted(p.name for p in (here / "model").iterdir())
    for name in (p.name for p in (here / "model").iterdir()):
        assert (elsewhere / "model" / name).read_bytes() == (here / "model" / name).read_bytes(), name
    assert json.loads((elsewhere / "metrics.json").read_text()) == json.loads((here / "metrics.json").read_text())
    assert json.loads((elsewhere / "run.json").read_text()) == summary == best.user_attrs[SUMMARY_ATTR]
    assert not (elsewhere / "trials").exists()


def test_a_second_invocation_resumes_the_study_and_adds_trials(tuned):
    from tasks.tune import run

    project, _ = tuned
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tune"]["n_trials"] = 1
    write_params(project, params)
    summary = run("params.yaml")
    assert summary["new_trials"] == [3] and sum(summary["trial_states"].values()) == 4
    trials = study_of(project).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    client = client_of(project)
    first, second = runs_of_kind(client, "tuning")
    assert "mlflow.parentRunId" not in second.data.tags
    new_trial = client.get_run(trials[3].user_attrs["mlflow_run_id"])
    assert new_trial.data.tags["mlflow.parentRunId"] == second.info.run_id
    assert json.loads((project / "reports" / "train_run.json").read_text())["run_id"] == summary["best_run_id"]
    assert summary["best_run_id"] == study_of(project).best_trial.user_attrs["mlflow_run_id"]
