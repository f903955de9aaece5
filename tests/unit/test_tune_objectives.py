"""Multi-objective tuning: the objectives and the selection rule as params, the rule's choice on a
Pareto front, the measured objectives of a trained model, and the study Optuna opens for them."""

import math
import warnings

import optuna
import pytest
import torch

from ml.config import load_params
from ml.errors import ConfigError, PipelineError
from ml.tune.objectives import (LATENCY_REPEATS, LATENCY_WARMUP, Condition, Objective, SelectRule, adopted_number,
                                measure, model_size_mb, parse_objectives, parse_select)
from ml.tune.study import open_study
from tests.conftest import base_params, write_params

optuna.logging.set_verbosity(optuna.logging.WARNING)

ACC_LAT = parse_objectives(["val_accuracy:max", "latency_ms:min"])
THREE = parse_objectives(["val_accuracy:max", "latency_ms:min", "param_count:min"])


def tune_params(tmp_path, **tune):
    raw = base_params()
    raw["tune"].update({"storage": f"sqlite:///{tmp_path}/optuna.db", "trials_dir": str(tmp_path / "trials"), **tune})
    return load_params(write_params(tmp_path, raw))


# -- params ---------------------------------------------------------------------------------------------

def test_objectives_parse_with_their_directions():
    assert ACC_LAT == (Objective("val_accuracy", "max"), Objective("latency_ms", "min"))
    assert [o.optuna_direction for o in ACC_LAT] == ["maximize", "minimize"]


@pytest.mark.parametrize("objectives, select, message", [
    (["val_accuracy:max", "latency_ms"], None,
     "tune.objectives[1]: objective latency_ms has no direction; expected latency_ms:max or latency_ms:min, got 'latency_ms'"),
    (["val_accuracy:max", "latency_ms:"], None, "tune.objectives[1]: objective latency_ms has no direction"),
    (["val_accuracy:up", "latency_ms:min"], None, "tune.objectives[0]: expected val_accuracy:max or val_accuracy:min, got 'val_accuracy:up'"),
    (["accuracy:max", "latency_ms:min"], None, "tune.objectives[0]: unknown objective 'accuracy'; expected one of val_accuracy, val_loss, latency_ms"),
    (["val_accuracy:max"], None, "tune.objectives: expected two or more objectives"),
    (["val_accuracy:max", "val_accuracy:min"], None, "tune.objectives: expected each objective once, got val_accuracy twice"),
    ([3, "latency_ms:min"], None, "tune.objectives[0]: expected str, got 3"),
    (None, "max val_accuracy", "tune.select: expected null without tune.objectives"),
    (["val_accuracy:max", "latency_ms:min"], "max accuracy where latency <= 2",
     "tune.select: unknown objective 'accuracy', 'latency' in 'max accuracy where latency <= 2'; expected one of tune.objectives: val_accuracy, latency_ms"),
    (["val_accuracy:max", "latency_ms:min"], "max val_accuracy where param_count < 10",
     "tune.select: unknown objective 'param_count'"),
    (["val_accuracy:max", "latency_ms:min"], "best val_accuracy", "tune.select: expected max or min, got 'best'"),
    (["val_accuracy:max", "latency_ms:min"], "max val_accuracy where latency_ms <= fast",
     "tune.select: expected a number, got 'fast'"),
    (["val_accuracy:max", "latency_ms:min"], "max val_accuracy where latency_ms =< 2", "tune.select: expected one of <= < >= > == !=, got '='"),
    (["val_accuracy:max", "latency_ms:min"], "max val_accuracy where", "tune.select: expected an objective at the end of"),
    (["val_accuracy:max", "latency_ms:min"], "max val_accuracy if latency_ms <= 2", "tune.select: expected where, got 'if'"),
    (["val_accuracy:max", "latency_ms:min"], "max val_accuracy where latency_ms <= 2 or val_accuracy > 0.9",
     "tune.select: expected and, got 'or'"),
    (["val_accuracy:max", "latency_ms:min"], "", "tune.select: expected max|min <objective>"),
])
def test_bad_objectives_and_rules_are_one_line_errors(tmp_path, objectives, select, message):
    with pytest.raises(ConfigError) as err:
        open_study(tune_params(tmp_path, objectives=objectives, select=select).tune)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, rule", [
    (None, SelectRule("max", "val_accuracy")),
    ("min latency_ms", SelectRule("min", "latency_ms")),
    ("max val_accuracy where latency_ms <= 2", SelectRule("max", "val_accuracy", (Condition("latency_ms", "<=", 2.0),))),
    ("max val_accuracy where latency_ms<2.5e-1", SelectRule("max", "val_accuracy", (Condition("latency_ms", "<", 0.25),))),
    ("  min param_count where val_accuracy >= 0.9 and latency_ms != 3 ",
     SelectRule("min", "param_count", (Condition("val_accuracy", ">=", 0.9), Condition("latency_ms", "!=", 3.0)))),
])
def test_rules_parse(text, rule):
    assert parse_select(text, THREE) == rule


def test_select_without_a_rule_follows_the_first_objective():
    assert parse_select(None, parse_objectives(["latency_ms:min", "val_accuracy:max"])) == SelectRule("min", "latency_ms")


# -- the rule's choice ----------------------------------------------------------------------------------

FRONT = {0: {"val_accuracy": 0.97, "latency_ms": 3.0}, 1: {"val_accuracy": 0.95, "latency_ms": 1.5},
         2: {"val_accuracy": 0.90, "latency_ms": 0.8}, 3: {"val_accuracy": 0.95, "latency_ms": 1.5}}


@pytest.mark.parametrize("text, number", [
    ("max val_accuracy", 0),
    ("min latency_ms", 2),
    ("max val_accuracy where latency_ms <= 2", 1),        # 1 and 3 tie: the lower number
    ("max val_accuracy where latency_ms < 1.5", 2),
    ("min latency_ms where val_accuracy >= 0.95", 1),
    ("max val_accuracy where latency_ms <= 2 and val_accuracy > 0.96", None),
])
def test_rule_picks_from_the_front(text, number):
    assert parse_select(text, ACC_LAT).pick(FRONT) == number


class Frozen:
    """The two attributes of an Optuna FrozenTrial that the rule reads."""

    def __init__(self, number, values):
        self.number, self.values = number, values


def test_no_trial_meeting_the_rule_is_a_one_line_error():
    front = [Frozen(n, [v["val_accuracy"], v["latency_ms"]]) for n, v in FRONT.items()]
    rule = parse_select("max val_accuracy where latency_ms <= 0.5", ACC_LAT)
    with pytest.raises(PipelineError) as err:
        adopted_number(rule, ACC_LAT, front, "s")
    assert str(err.value) == ("tune.select: no Pareto-optimal trial of study s meets max val_accuracy where "
                              "latency_ms <= 0.5 (4 on the front: latency_ms 0.8..3); relax the rule or run more trials")
    assert adopted_number(parse_select("max val_accuracy where latency_ms <= 2", ACC_LAT), ACC_LAT, front, "s") == 1


# -- measured objectives ---------------------------------------------------------------------------------

def test_measured_objectives_of_a_model(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"x" * 2**20)
    example = torch.rand(5, 64).numpy()
    values = measure(parse_objectives(["val_loss:min", "latency_ms:min", "param_count:min", "model_size_mb:min"]),
                     {"val_loss": 0.25, "val_accuracy": 0.9}, model, tmp_path / "model", example, 8)
    assert list(values) == ["val_loss", "latency_ms", "param_count", "model_size_mb"]
    assert values["val_loss"] == 0.25
    assert values["param_count"] == 64 * 16 + 16 + 16 * 10 + 10
    assert values["model_size_mb"] == pytest.approx(1.0) == model_size_mb(tmp_path / "model")
    assert math.isfinite(values["latency_ms"]) and values["latency_ms"] > 0


class RowsSeen(torch.nn.Module):
    """A classifier that remembers the batch sizes it was called with."""

    def __init__(self):
        super().__init__()
        self.linear, self.rows = torch.nn.Linear(64, 10), []

    def forward(self, x):
        self.rows.append(len(x))
        return self.linear(x)


@pytest.mark.parametrize("batch_size", [1, 12])
def test_latency_times_requests_of_the_serving_batch_size(tmp_path, batch_size):
    model = RowsSeen()
    measure(parse_objectives(["val_accuracy:max", "latency_ms:min"]), {"val_accuracy": 0.9}, model, tmp_path,
            torch.rand(5, 64).numpy(), batch_size)
    assert model.rows == [batch_size] * (LATENCY_WARMUP + LATENCY_REPEATS)


# -- the study ---------------------------------------------------------------------------------------------

def test_multi_objective_study_samples_with_nsga2_and_never_prunes(tmp_path):
    tune = tune_params(tmp_path, objectives=["val_accuracy:max", "latency_ms:min"]).tune
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no experimental-feature warning reaches the terminal
        study = open_study(tune)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert isinstance(study.sampler, optuna.samplers.NSGAIISampler)
    assert isinstance(study.pruner, optuna.pruners.NopPruner)


def test_a_study_keeps_its_objectives(tmp_path):
    open_study(tune_params(tmp_path, objectives=["val_accuracy:max", "latency_ms:min"]).tune)
    with pytest.raises(ConfigError, match=r"^tune.objectives: study digits-mlp in sqlite:///.* has objectives "
                                          r"maximize, minimize; expected those or another tune.study_name"):
        open_study(tune_params(tmp_path, objectives=["val_accuracy:max", "param_count:max"]).tune.model_copy(
            update={"objectives": ["val_accuracy:max", "param_count:max", "latency_ms:min"]}))
