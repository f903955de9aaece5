"""What a tuning study optimizes, and which trial of a multi-objective study is adopted.

    objectives = parse_objectives(["val_accuracy:max", "latency_ms:min"])
    rule = parse_select("max val_accuracy where latency_ms <= 2", objectives)
    number = rule.pick({t.number: dict(zip(names, t.values)) for t in study.best_trials})

A single-objective study scores a trial by ``tune.metric`` (``tune.objectives`` null) with Optuna's
TPE sampler and the configured pruner. With two or more ``tune.objectives`` (``name:max`` or
``name:min``, the direction always written out) the study is multi-objective: NSGA-II samples, no
trial is pruned (Optuna's ``Trial.report``/pruning exist for single-objective studies only), and
Optuna keeps the Pareto front (``study.best_trials``). ``tune.select`` states which trial of that
front is adopted::

    rule      := ("max" | "min") OBJECTIVE [ "where" condition { "and" condition } ]
    condition := OBJECTIVE ("<=" | "<" | ">=" | ">" | "==" | "!=") NUMBER

Ties go to the lowest trial number. With no ``tune.select``, the rule is the first objective in its
own direction. When no trial of the front meets the conditions, the stage fails with one line that
says so; nothing is adopted.

The rule grammar is small enough that a tokenizer and a loop are clearer than a parser library.
``ml.config`` reads ``tune.objectives`` and ``tune.select`` as plain values; they are checked here when
the study opens (:func:`select_rule`), before any trial runs, so that no stage but tune depends on
this package.
"""

from __future__ import annotations

import math
import operator
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ml.config import TuneConfig

# The values a trial can be scored by: validation metrics at its last epoch, and measurements of its model.
OBJECTIVE_NAMES = ("val_accuracy", "val_loss", "latency_ms", "param_count", "model_size_mb")
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq, "!=": operator.ne}
GRAMMAR = "max|min <objective> [where <objective> <op> <number> [and ...]]"
# latency_ms: the median of this many timed calls, after warm-up calls that are not timed.
LATENCY_REPEATS = 30
LATENCY_WARMUP = 5
_TOKEN = re.compile(r"\s*(<=|>=|==|!=|<|>|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[A-Za-z_][A-Za-z0-9_]*|\S)")


@dataclass(frozen=True)
class Objective:
    """One value a study optimizes and the way it improves (``"max"`` or ``"min"``)."""

    name: str
    direction: str

    @property
    def optuna_direction(self) -> str:
        return "maximize" if self.direction == "max" else "minimize"

    def __str__(self) -> str:
        return f"{self.name}:{self.direction}"


def parse_objective(text: Any, key: str = "tune.objectives") -> Objective:
    """``"name:max"`` or ``"name:min"`` as an :class:`Objective`; a one-line ``ValueError`` otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"{key}: expected <objective>:max or <objective>:min, got {text!r}")
    name, sep, direction = text.strip().partition(":")
    if name not in OBJECTIVE_NAMES:
        raise ValueError(f"{key}: unknown objective {name!r}; expected one of {', '.join(OBJECTIVE_NAMES)}")
    if not sep or not direction:
        raise ValueError(f"{key}: objective {name} has no direction; expected {name}:max or {name}:min, got {text!r}")
    if direction not in ("max", "min"):
        raise ValueError(f"{key}: expected {name}:max or {name}:min, got {text!r}")
    return Objective(name, direction)


def parse_objectives(items: Sequence[Any]) -> tuple[Objective, ...]:
    """``tune.objectives`` checked: two or more distinct objectives, each with its direction."""
    objectives = tuple(parse_objective(item, f"tune.objectives[{i}]") for i, item in enumerate(items))
    if len(objectives) < 2:
        raise ValueError(f"tune.objectives: expected two or more objectives (one is tune.metric and tune.direction), "
                         f"got {list(items)!r}")
    names = [o.name for o in objectives]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"tune.objectives: expected each objective once, got {', '.join(repeated)} twice")
    return objectives


# -- the selection rule ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Condition:
    """``name op value``: a bound a trial's objective value must meet."""

    name: str
    op: str
    value: float

    def holds(self, values: Mapping[str, float]) -> bool:
        return OPERATORS[self.op](values[self.name], self.value)

    def __str__(self) -> str:
        return f"{self.name} {self.op} {self.value:g}"


@dataclass(frozen=True)
class SelectRule:
    """Which trial of a Pareto front is adopted: the best ``target`` (``goal`` max or min) among the
    trials that meet every condition; ties to the lowest trial number."""

    goal: str
    target: str
    conditions: tuple[Condition, ...] = ()

    def pick(self, candidates: Mapping[int, Mapping[str, float]]) -> int | None:
        """The trial number the rule adopts among ``{number: {objective: value}}``, or None when no
        candidate meets the conditions."""
        feasible = [n for n, values in candidates.items() if all(c.holds(values) for c in self.conditions)]
        if not feasible:
            return None
        sign = -1.0 if self.goal == "max" else 1.0
        return min(feasible, key=lambda n: (sign * candidates[n][self.target], n))

    def __str__(self) -> str:
        where = " and ".join(map(str, self.conditions))
        return f"{self.goal} {self.target}" + (f" where {where}" if where else "")


def parse_select(text: str | None, objectives: Sequence[Objective]) -> SelectRule:
    """``tune.select`` as a :class:`SelectRule` over ``objectives``; None gives the first objective in
    its own direction. Raises a one-line ``ValueError`` naming what is wrong."""
    names = [o.name for o in objectives]
    if text is None:
        return SelectRule(objectives[0].direction, objectives[0].name)
    tokens = _TOKEN.findall(text)
    if not tokens:
        raise ValueError(f"tune.select: expected {GRAMMAR}, got {text!r}")
    position = 0

    def take(what: str, accept: Callable[[str], bool]) -> str:
        nonlocal position
        if position >= len(tokens):
            raise ValueError(f"tune.select: expected {what} at the end of {text!r} ({GRAMMAR})")
        token = tokens[position]
        if not accept(token):
            raise ValueError(f"tune.select: expected {what}, got {token!r} in {text!r} ({GRAMMAR})")
        position += 1
        return token

    is_name = re.compile(r"[A-Za-z_]\w*").fullmatch
    goal = take("max or min", lambda t: t in ("max", "min"))
    target = take("an objective", lambda t: bool(is_name(t)))
    conditions = []
    if position < len(tokens):
        take("where", lambda t: t == "where")
        while True:
            name = take("an objective", lambda t: bool(is_name(t)))
            op = take(f"one of {' '.join(OPERATORS)}", lambda t: t in OPERATORS)
            value = take("a number", lambda t: _is_number(t))
            conditions.append(Condition(name, op, float(value)))
            if position == len(tokens):
                break
            take("and", lambda t: t == "and")
    unknown = [n for n in dict.fromkeys([target, *(c.name for c in conditions)]) if n not in names]
    if unknown:
        raise ValueError(f"tune.select: unknown objective {', '.join(map(repr, unknown))} in {text!r}; "
                         f"expected one of tune.objectives: {', '.join(names)}")
    return SelectRule(goal, target, tuple(conditions))


def _is_number(token: str) -> bool:
    try:
        return math.isfinite(float(token))
    except ValueError:
        return False


def adopted_number(rule: SelectRule, objectives: Sequence[Objective], front: Sequence[Any], study_name: str) -> int:
    """The number of the trial ``rule`` adopts from ``front`` (Optuna's ``study.best_trials``);
    a :class:`ml.errors.PipelineError` when none meets its conditions."""
    from ml.errors import PipelineError

    names = [o.name for o in objectives]
    candidates = {t.number: dict(zip(names, t.values)) for t in front}
    number = rule.pick(candidates)
    if number is None:
        ranges = ", ".join(f"{c.name} {min(v[c.name] for v in candidates.values()):.4g}.."
                           f"{max(v[c.name] for v in candidates.values()):.4g}"
                           for c in rule.conditions) if candidates else "no trial"
        raise PipelineError(f"tune.select: no Pareto-optimal trial of study {study_name} meets {rule!s} "
                            f"({len(candidates)} on the front: {ranges}); relax the rule or run more trials")
    return number


def objectives_of(tune: TuneConfig) -> tuple[Objective, ...]:
    """The study's objectives: ``tune.objectives``, or ``tune.metric`` in ``tune.direction`` alone."""
    if tune.objectives is None:
        return (Objective(tune.metric, "max" if tune.direction == "maximize" else "min"),)
    return _config_errors(parse_objectives, tune.objectives)


def select_rule(tune: TuneConfig) -> SelectRule:
    """The rule that adopts a trial of ``tune``'s study (a single objective: its best value)."""
    return _config_errors(parse_select, tune.select, objectives_of(tune))


def _config_errors(parse: Callable[..., Any], *args: Any) -> Any:
    """``parse(*args)``, its ``ValueError`` as the one-line :class:`ml.errors.ConfigError` users see."""
    from ml.errors import ConfigError

    try:
        return parse(*args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def adopted_trial(study: Any, tune: TuneConfig) -> Any:
    """The trial whose model the study hands on: Optuna's best trial of a single-objective study,
    the trial ``tune.select`` picks from the Pareto front of a multi-objective one."""
    if not tune.multi_objective:
        return study.best_trial
    front = study.best_trials
    number = adopted_number(select_rule(tune), objectives_of(tune), front, tune.study_name)
    return next(t for t in front if t.number == number)


# -- measuring a trial's objectives ---------------------------------------------------------------------

def latency_ms(model: Any, rows: Any, repeats: int = LATENCY_REPEATS, warmup: int = LATENCY_WARMUP) -> float:
    """Median milliseconds of one :func:`ml.model.predict.predict` call on ``rows`` (a float32 array,
    one request's rows), on the model's device, as the serving endpoint calls it."""
    from ml.model.predict import inference_model, predict

    ready = inference_model(model)
    for _ in range(warmup):
        predict(ready, rows)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(ready, rows)
        timings.append(time.perf_counter() - start)
    return 1000 * statistics.median(timings)


def model_size_mb(model_dir: str | Path) -> float:
    """Size of the saved model's files (weights and spec), in MiB."""
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file()) / 2**20


def measure(objectives: Sequence[Objective], final_metrics: Mapping[str, float], model: Any, model_dir: str | Path,
            example: Any, batch_size: int) -> dict[str, float]:
    """Each objective's value for one trained trial, in the order of ``objectives``: the validation
    metrics at its last epoch, its parameter count, the size of ``model_dir`` and the latency of one
    request of ``batch_size`` rows (``example``'s feature rows, repeated as needed)."""
    import numpy as np

    measured: dict[str, Callable[[], float]] = {
        "latency_ms": lambda: latency_ms(model, np.resize(example, (batch_size, example.shape[1]))),
        "param_count": lambda: float(sum(p.numel() for p in model.parameters())),
        "model_size_mb": lambda: model_size_mb(model_dir),
    }
    return {o.name: float(final_metrics[o.name]) if o.name not in measured else measured[o.name]()
            for o in objectives}
