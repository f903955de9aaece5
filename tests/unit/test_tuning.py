"""Tuning: the `tune` params, the search space as Optuna suggestions, pruning from epoch metrics, study
resume in an RDB storage, the study report, and the best trial taking the trained model's place."""

import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch

from ml.config import load_params
from ml.errors import ConfigError
from ml.train.loop import LoopState, fit
from ml.tune.objectives import Objective
from ml.tune.study import (PruningHook, StudyOutcome, adopt_best_trial, choice_label, decode_params, leads_study,
                           open_study, trial_dir, trial_train_config, write_study_report)
from tests.conftest import REPO, base_params, write_params

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {"lr": {"low": 0.001, "high": 0.1, "log": True}, "dropout": {"low": 0.0, "high": 0.5},
         "batch_size": {"choices": [32, 64]}, "hidden_sizes": {"choices": [[16], [32, 16]]}}


def params_with(tmp_path, **tune):
    raw = base_params()
    raw["tune"].update({"space": SPACE, "storage": f"sqlite:///{tmp_path}/optuna.db", "trials_dir": str(tmp_path / "trials"),
                        **tune})
    return load_params(write_params(tmp_path, raw))


# -- params ---------------------------------------------------------------------------------------------

def test_repository_tune_section_loads():
    tune = load_params(REPO / "params.yaml").tune
    assert tune.metric == "val_accuracy" and tune.direction == "maximize"
    assert tune.storage.startswith("sqlite:///")
    names = [p.name for p in tune.search_space]
    assert names == ["lr", "weight_decay", "dropout", "batch_size", "hidden_sizes"]
    (hidden,) = [p for p in tune.search_space if p.name == "hidden_sizes"]
    assert hidden.choices == ((64,), (128, 64), (256, 128))


@pytest.mark.parametrize("key, value, message", [
    ("n_trials", 0, "tune.n_trials: expected trials each invocation runs"),
    ("timeout_s", -1, "tune.timeout_s: expected seconds after which no new trial starts"),
    ("metric", "accuracy", "tune.metric: expected one of val_accuracy, val_loss, got 'accuracy'"),
    ("direction", "minimize", "tune.direction: expected maximize for tune.metric val_accuracy, got 'minimize'"),
    ("pruner", "hyperband", "tune.pruner: expected one of median, none, got 'hyperband'"),
    ("pruner_warmup_epochs", -1, "tune.pruner_warmup_epochs: expected epochs a trial runs"),
    ("storage", "optuna.db", "tune.storage: expected an Optuna RDB URL such as sqlite:///optuna.db"),
    ("study_name", "a/b", "tune.study_name: expected study name: letters, digits"),
    ("space", {}, "tune.space: expected at least one train key to search"),
    ("space", {"momentum": {"low": 0.1, "high": 0.9}},
     "tune.space.momentum: unknown parameter; expected one of lr, weight_decay, dropout, batch_size, hidden_sizes"),
    ("space", {"lr": 0.01}, "tune.space.lr: expected a mapping {low, high, log} or {choices}, got 0.01"),
    ("space", {"lr": {"high": 0.1}}, "tune.space.lr.low: missing key"),
    ("space", {"lr": {"low": 0.001, "high": 0.1, "step": 2}}, "tune.space.lr.step: unknown key; expected low, high, log"),
    ("space", {"lr": {"low": "small", "high": 0.1}}, "tune.space.lr.low: expected float, got 'small'"),
    ("space", {"lr": {"low": -1, "high": 0.1}}, "tune.space.lr.low: expected AdamW learning rate, > 0, got -1.0"),
    ("space", {"lr": {"low": 0.1, "high": 0.01}}, "tune.space.lr.high: expected a value above tune.space.lr.low, got 0.01 <= 0.1"),
    ("space", {"dropout": {"low": 0.0, "high": 1.0}}, "tune.space.dropout.high: expected dropout probability"),
    ("space", {"dropout": {"low": 0.0, "high": 0.5, "log": True}}, "tune.space.dropout.log: expected false when low is 0"),
    ("space", {"dropout": {"low": 0.0, "high": 0.5, "log": "yes"}}, "tune.space.dropout.log: expected bool, got 'yes'"),
    ("space", {"batch_size": {"low": 16, "high": 128}},
     "tune.space.batch_size: expected {choices: [...]} (a range suits only lr, weight_decay, dropout)"),
    ("space", {"batch_size": {"choices": [32], "low": 1}}, "tune.space.batch_size: expected `choices` alone, got keys choices, low"),
    ("space", {"batch_size": {"choices": []}}, "tune.space.batch_size.choices: expected a non-empty list of values"),
    ("space", {"batch_size": {"choices": [32, 0]}}, "tune.space.batch_size.choices[1]: expected samples per optimizer step, got 0"),
    ("space", {"batch_size": {"choices": [32, 32]}}, "tune.space.batch_size.choices: expected distinct values, got [32, 32]"),
    ("space", {"hidden_sizes": {"choices": [64]}}, "tune.space.hidden_sizes.choices[0]: expected a list, got 64"),
    ("space", {"hidden_sizes": {"choices": [[64, 0]]}}, "tune.space.hidden_sizes.choices[0]: expected widths"),
])
def test_bad_tune_values_name_the_key(tmp_path, key, value, message):
    raw = base_params()
    raw["tune"][key] = value
    with pytest.raises(ConfigError) as err:
        load_params(write_params(tmp_path, raw))
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_tune_keys_unknown_or_missing_are_named(tmp_path):
    raw = base_params()
    raw["tune"]["trials"] = 3
    with pytest.raises(ConfigError, match=r"^tune.trials: unknown key; expected one of n_trials"):
        load_params(write_params(tmp_path, raw))
    del raw["tune"]["trials"], raw["tune"]["seed"]
    with pytest.raises(ConfigError, match=r"^tune.seed: missing key \(seed of the TPE sampler\)"):
        load_params(write_params(tmp_path, raw))


def test_val_loss_is_minimized(tmp_path):
    tune = params_with(tmp_path, metric="val_loss", direction="minimize").tune
    assert (tune.metric, tune.direction) == ("val_loss", "minimize")


# -- the search space -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, label", [((128, 64), "128x64"), ((16,), "16"), (64, 64), (0.5, 0.5)])
def test_choice_labels_are_values_optuna_can_store(value, label):
    assert choice_label(value) == label


def suggestions(params, seed, n=6):
    configs = []

    def objective(trial):
        configs.append(trial_train_config(trial, params.train, params.tune))
        return 0.0

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), direction="maximize")
    study.optimize(objective, n_trials=n)
    return study, configs


def test_search_space_becomes_optuna_suggestions_and_train_configs(tmp_path):
    params = params_with(tmp_path)
    study, configs = suggestions(params, seed=7)
    for trial, cfg in zip(study.trials, configs, strict=True):
        assert 0.001 <= cfg.lr <= 0.1 and 0.0 <= cfg.dropout <= 0.5
        assert cfg.batch_size in (32, 64) and cfg.hidden_sizes in ((16,), (32, 16))
        assert (cfg.weight_decay, cfg.epochs, cfg.seed) == (params.train.weight_decay, params.train.epochs, params.train.seed)
        directory = trial_dir(params.tune, trial.number)
        assert directory == tmp_path / "trials" / params.tune.study_name / f"trial-{trial.number:04d}"
        assert (cfg.model_dir, cfg.run_file, cfg.metrics_file) == (
            str(directory / "model"), str(directory / "run.json"), str(directory / "metrics.json"))
        assert trial.params["hidden_sizes"] == choice_label(cfg.hidden_sizes)
        assert decode_params(params.tune.search_space, trial.params) == {
            "lr": cfg.lr, "dropout": cfg.dropout, "batch_size": cfg.batch_size, "hidden_sizes": list(cfg.hidden_sizes)}
    dists = study.trials[0].distributions
    assert dists["lr"] == optuna.distributions.FloatDistribution(0.001, 0.1, log=True)
    assert dists["dropout"] == optuna.distributions.FloatDistribution(0.0, 0.5)
    assert dists["hidden_sizes"] == optuna.distributions.CategoricalDistribution(["16", "32x16"])
    assert len({cfg.lr for cfg in configs}) == len(configs)


def test_same_sampler_seed_gives_the_same_trials(tmp_path):
    params = params_with(tmp_path)
    assert suggestions(params, seed=3)[1] == suggestions(params, seed=3)[1]
    assert suggestions(params, seed=3)[1] != suggestions(params, seed=4)[1]


# -- pruning --------------------------------------------------------------------------------------------

def test_pruning_hook_stops_the_loop_and_the_trial_is_recorded_pruned():
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    curves = iter([[0.80, 0.90, 0.95], [0.10, 0.20, 0.30]])
    states = []

    def objective(trial):
        hook, state = PruningHook(trial, "val_accuracy"), LoopState()
        for value in next(curves):
            if state.stop:
                break
            state.epoch += 1
            hook.on_epoch_end(state, {"val_accuracy": value, "val_loss": 1 - value})
        states.append(state)
        hook.raise_if_pruned()
        return value

    study.optimize(objective, n_trials=2)
    first, second = study.trials
    assert first.state == optuna.trial.TrialState.COMPLETE and first.value == 0.95
    assert not states[0].stop and states[0].stop_reason is None
    assert second.state == optuna.trial.TrialState.PRUNED
    assert (states[1].stop, states[1].stop_reason, states[1].epoch) == (True, "pruned", 1)
    assert second.intermediate_values == {1: 0.10}


def test_pruning_inside_the_training_loop_ends_it_after_the_epoch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    y = (x[:, 0] > 0).long()
    stopped = []

    def objective(trial):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        hook = PruningHook(trial, "val_accuracy")
        state = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), (x, y), epochs=5, batch_size=16,
                    generator=torch.Generator().manual_seed(0), hooks=[hook])
        stopped.append(state)
        hook.raise_if_pruned()
        return state.history[-1]["val_accuracy"]

    # accuracy never reaches 2.0: every trial is pruned at the first epoch after the 2-epoch warmup
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0, n_warmup_steps=2))
    study.optimize(objective, n_trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert sorted(trial.intermediate_values) == [1, 2]
    (state,) = stopped
    assert (state.epoch, state.stop_reason, len(state.history)) == (2, "pruned", 2)
    assert state.global_step == 2 * 4


# -- the study in its storage ---------------------------------------------------------------------------

def asked(directions, completed):
    """A new trial of an in-memory study whose completed trials have the ``completed`` values."""
    study = optuna.create_study(directions=directions)
    for values in completed:
        study.add_trial(optuna.trial.create_trial(values=values, state=optuna.trial.TrialState.COMPLETE))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, intermediate_values={0: 1.0}))
    return study.ask()


@pytest.mark.parametrize(("completed", "value", "leads"), [
    ([], 0.5, True),                    # the first trial always logs its model
    ([[0.9], [0.95]], 0.95, True),      # a tie with the best leads (Optuna may adopt either)
    ([[0.9], [0.95]], 0.96, True),
    ([[0.9], [0.95]], 0.94, False),     # a better trial has completed: this one cannot be adopted
])
def test_a_trial_logs_its_model_only_while_no_completed_trial_beats_it(completed, value, leads):
    assert leads_study(asked(["maximize"], completed), {"val_accuracy": value},
                       [Objective("val_accuracy", "max")]) is leads


def test_a_minimized_metric_leads_when_lower():
    objectives = [Objective("val_loss", "min")]
    assert leads_study(asked(["minimize"], [[0.3]]), {"val_loss": 0.2}, objectives)
    assert not leads_study(asked(["minimize"], [[0.3]]), {"val_loss": 0.4}, objectives)


def test_a_multi_objective_trial_leads_while_on_the_pareto_front():
    objectives = [Objective("val_accuracy", "max"), Objective("latency_ms", "min")]
    study = [[0.95, 2.0], [0.90, 1.0]]
    assert leads_study(asked(["maximize", "minimize"], study), {"val_accuracy": 0.92, "latency_ms": 1.5}, objectives)
    assert leads_study(asked(["maximize", "minimize"], study), {"val_accuracy": 0.95, "latency_ms": 2.0}, objectives)
    assert not leads_study(asked(["maximize", "minimize"], study), {"val_accuracy": 0.94, "latency_ms": 2.5},
                           objectives)  # [0.95, 2.0] is better in both


def test_study_resumes_from_rdb_storage_and_goes_on_with_new_suggestions(tmp_path):
    params = params_with(tmp_path, pruner="none")

    def objective(trial):
        return trial_train_config(trial, params.train, params.tune).lr

    first = open_study(params.tune)
    first.optimize(objective, n_trials=2)
    resumed = open_study(params.tune)
    assert [t.number for t in resumed.trials] == [0, 1]
    assert isinstance(resumed.pruner, optuna.pruners.NopPruner)
    resumed.optimize(objective, n_trials=2)
    trials = open_study(params.tune).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert {t.params["lr"] for t in trials[2:]}.isdisjoint(t.params["lr"] for t in trials[:2])
    assert (tmp_path / "optuna.db").is_file()


def test_a_study_of_the_other_direction_is_refused(tmp_path):
    params = params_with(tmp_path)
    open_study(params.tune)
    other = params_with(tmp_path, metric="val_loss", direction="minimize")
    with pytest.raises(ConfigError, match=r"^tune.direction: study digits-mlp in sqlite:///.* maximizes; "
                                          r"expected maximize or another tune.study_name, got 'minimize'$"):
        open_study(other.tune)


def test_study_report_has_plots_importances_and_the_trial_table(tmp_path):
    study = optuna.create_study(direction="maximize")
    dists = {"lr": optuna.distributions.FloatDistribution(0.001, 0.1, log=True),
             "batch_size": optuna.distributions.CategoricalDistribution([32, 64])}
    for i, (lr, bs, value) in enumerate([(0.001, 32, 0.7), (0.01, 64, 0.9), (0.05, 32, 0.8), (0.003, 64, 0.75)]):
        study.add_trial(optuna.trial.create_trial(params={"lr": lr, "batch_size": bs}, distributions=dists, value=value,
                                                  intermediate_values={1: value / 2, 2: value}))
    written = write_study_report(study, tmp_path, seed=0)
    names = sorted(p.name for p in written)
    assert names == ["intermediate_values.png", "optimization_history.png", "parallel_coordinate.png",
                     "param_importances.json", "param_importances.png", "plots.json", "trials.csv"]
    assert all(p.stat().st_size > 0 for p in written)
    assert set(json.loads((tmp_path / "param_importances.json").read_text())) == {"lr", "batch_size"}
    assert len((tmp_path / "trials.csv").read_text().splitlines()) == 5


def test_study_report_of_one_trial_has_no_importances(tmp_path):
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.01},
                                              distributions={"lr": optuna.distributions.FloatDistribution(0.001, 0.1)},
                                              value=0.9))
    names = sorted(p.name for p in write_study_report(study, tmp_path, seed=0))
    assert names == ["optimization_history.png", "parallel_coordinate.png", "plots.json", "trials.csv"]
    assert json.loads((tmp_path / "plots.json").read_text())["skipped"] == {
        "intermediate_values": "no trial reported an intermediate value",
        "param_importances": "needs 2 completed trials, the study has 1"}


# -- the best trial becomes the trained model -----------------------------------------------------------

class ArtifactsOf:
    """A hand-written stand-in for MlflowClient.download_artifacts over a directory per run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls = []

    def download_artifacts(self, run_id, path, dst_path):
        self.calls.append((run_id, path))
        source, target = self.root / run_id / path, Path(dst_path) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
        return str(target)


def outcome_for(number, run_id):
    summary = {"run_id": run_id, "model_uri": "models:/m-1", "experiment": "e", "run_url": "u",
               "parent_run_id": "study", "dataset": {"md5": "d.dir"}, "git": {"commit": "c", "branch": "b", "dirty": False},
               "resume": "", "stopped_early": None, "final": {"val_accuracy": 0.9}}
    return StudyOutcome("digits-mlp", number, 0.9, {"lr": 0.01}, run_id, summary, [number], {"COMPLETE": 1})


def test_best_trial_weights_and_summary_replace_the_trained_model(tmp_path):
    params = params_with(tmp_path, study_name="digits-mlp")
    train = params.train.model_copy(update={"model_dir": str(tmp_path / "models/model"),
                                           "run_file": str(tmp_path / "reports/train_run.json"),
                                           "metrics_file": str(tmp_path / "reports/train_metrics.json")})
    local = trial_dir(params.tune, 3)
    (local / "model").mkdir(parents=True)
    (local / "model" / "model.safetensors").write_bytes(b"trial-3 weights")
    (local / "metrics.json").write_text(json.dumps([{"epoch": 1, "val_accuracy": 0.9}]))
    (local / "run.json").write_text(json.dumps({"run_id": "run-3"}))
    Path(train.model_dir).mkdir(parents=True)
    (Path(train.model_dir) / "stale.bin").write_bytes(b"old")
    client = ArtifactsOf(tmp_path / "artifacts")
    summary = adopt_best_trial(outcome_for(3, "run-3"), train, params.tune, client)
    assert json.loads(Path(train.run_file).read_text()) == summary and summary["run_id"] == "run-3"
    assert sorted(p.name for p in Path(train.model_dir).iterdir()) == ["model.safetensors"]
    assert (Path(train.model_dir) / "model.safetensors").read_bytes() == b"trial-3 weights"
    assert json.loads(Path(train.metrics_file).read_text()) == [{"epoch": 1, "val_accuracy": 0.9}]
    assert client.calls == []


def test_best_trial_of_another_machine_is_fetched_from_its_run(tmp_path):
    params = params_with(tmp_path)
    train = params.train.model_copy(update={"model_dir": str(tmp_path / "model"), "run_file": str(tmp_path / "run.json"),
                                           "metrics_file": str(tmp_path / "m.json")})
    stale = trial_dir(params.tune, 5)  # left by another study of the same name: not this run's files
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "model.safetensors").write_bytes(b"stale")
    (stale / "run.json").write_text(json.dumps({"run_id": "someone-else"}))
    artifacts = tmp_path / "artifacts" / "run-5"
    (artifacts / "weights").mkdir(parents=True)
    (artifacts / "weights" / "model.safetensors").write_bytes(b"trial-5 weights")
    (artifacts / "metrics").mkdir()
    (artifacts / "metrics" / "metrics.json").write_text("[]")
    client = ArtifactsOf(tmp_path / "artifacts")
    adopt_best_trial(outcome_for(5, "run-5"), train, params.tune, client)
    assert (Path(train.model_dir) / "model.safetensors").read_bytes() == b"trial-5 weights"
    assert client.calls == [("run-5", "weights"), ("run-5", "metrics/metrics.json")]
    assert json.loads(Path(train.run_file).read_text())["run_id"] == "run-5"
