"""tune: an Optuna study over train's hyperparameters, each trial an MLflow run nested in the study's.

    study = open_study(params.tune)
    outcome = run_study(study, context, study_run)   # trials: suggest -> train -> report/prune -> log
    summary = adopt_best_trial(outcome, params.train, study_run.client)

A trial trains with ``params.train`` except for the keys of ``tune.space``, into its own directory
(``<trials_dir>/<study_name>/trial-NNNN/``), without checkpoints. After each epoch a
:class:`PruningHook` reports the monitored validation metric to Optuna; when the pruner says so the
loop stops and the trial is recorded as pruned. Completed trials log their weights; a completed
trial that no earlier completed trial dominates also logs its MLflow model (:func:`leads_study`),
so the trials that could be adopted carry one and the others skip its cost. The best trial
then becomes the pipeline's trained model: its weights go to ``train.model_dir`` and its summary to
``train.run_file`` in the train stage's format, so evaluate and register continue from it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import Params, SearchParam, TrainConfig, TuneConfig, flatten
from ml.errors import ConfigError, PipelineError
from ml.io import atomic_write_json, replace_dir
from ml.train.loop import Callback
from ml.tune.objectives import Objective, adopted_trial, measure, objectives_of, select_rule
from ml.tune.plots import write_study_report

if TYPE_CHECKING:
    import numpy as np

    from ml.train.loop import LoopState

logger = logging.getLogger(__name__)

TRIAL_TAG = "optuna_trial"
STUDY_TAG = "optuna_study"
STATE_TAG = "optuna_state"
MODEL_LOGGED_TAG = "model_logged"  # "true" on a trial that led its study when it completed (see leads_study)
RUN_ID_ATTR = "mlflow_run_id"
SUMMARY_ATTR = "train_summary"
WEIGHTS_ARTIFACTS = "weights"
METRICS_ARTIFACTS = "metrics"
# A trial whose process died is still RUNNING in the storage; after this long without a heartbeat the
# next optimize() of the study marks it FAIL.
HEARTBEAT_S = 60
GRACE_S = 180


# -- the search space -------------------------------------------------------------------------------

def choice_label(value: Any) -> Any:
    """Optuna keeps categorical choices as None/bool/int/float/str: a tuple of widths becomes "128x64"."""
    return "x".join(str(v) for v in value) if isinstance(value, tuple) else value


def suggest(trial: Any, param: SearchParam) -> Any:
    """The trial's value for one dimension, as the train key takes it (``hidden_sizes`` a tuple)."""
    if param.choices:
        by_label = {choice_label(c): c for c in param.choices}
        return by_label[trial.suggest_categorical(param.name, list(by_label))]
    return trial.suggest_float(param.name, param.low, param.high, log=param.log)


def decode_params(space: tuple[SearchParam, ...], optuna_params: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna's stored params as train values (labels of list choices back to lists)."""
    out: dict[str, Any] = {}
    for param in space:
        if param.name not in optuna_params:
            continue
        value = optuna_params[param.name]
        by_label = {choice_label(c): c for c in param.choices}
        value = by_label.get(value, value) if param.choices else value
        out[param.name] = list(value) if isinstance(value, tuple) else value
    return out


def trial_dir(cfg: TuneConfig, number: int) -> Path:
    return Path(cfg.trials_dir) / cfg.study_name / f"trial-{number:04d}"


def trial_train_config(trial: Any, base: TrainConfig, cfg: TuneConfig) -> TrainConfig:
    """``base`` with the trial's suggestions, writing weights, run file and metrics under its directory."""
    values = {param.name: suggest(trial, param) for param in cfg.search_space}
    directory = trial_dir(cfg, trial.number)
    return base.model_copy(update={**values, "model_dir": str(directory / "model"),
                                   "run_file": str(directory / "run.json"),
                                   "metrics_file": str(directory / "metrics.json")})


def trial_run_name(number: int, cfg: TrainConfig) -> str:
    return f"trial-{number}-lr{cfg.lr:.3g}-bs{cfg.batch_size}"


# -- pruning ------------------------------------------------------------------------------------------

class PruningHook(Callback):
    """The one pruning routine: reports ``metric`` to the trial after every epoch; when the pruner
    prunes, stops the loop (``state.stop_reason = "pruned"``). :meth:`raise_if_pruned` then ends
    the trial as pruned."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.pruned_at: int | None = None
        self.last_value: float | None = None

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        self.last_value = metrics[self.metric]
        self.trial.report(self.last_value, state.epoch)
        if self.trial.should_prune():
            self.pruned_at = state.epoch
            state.stop = True
            state.stop_reason = "pruned"

    def raise_if_pruned(self) -> None:
        import optuna

        if self.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned after epoch {self.pruned_at}: {self.metric}={self.last_value:.6g}")


# -- the study ----------------------------------------------------------------------------------------

def redacted_storage(url: str) -> str:
    """The storage URL without its password, for tags and params."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: show only its scheme
        return url.split("://", 1)[0] + "://..."


def open_study(cfg: TuneConfig) -> Any:
    """Creates the study in ``cfg.storage`` or resumes it (``load_if_exists``).

    The sampler's seed is ``cfg.seed`` plus the trials the study already has, so a resumed study
    goes on deterministically instead of drawing its first random configurations again. A study
    with ``tune.objectives`` samples with NSGA-II and prunes nothing (Optuna prunes single-objective
    studies only).
    """
    import optuna

    directions = [o.optuna_direction for o in objectives_of(cfg)]
    select_rule(cfg)  # a bad rule fails here, before the storage is touched or any trial runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
        storage = optuna.storages.RDBStorage(cfg.storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    if cfg.pruner == "median" and not cfg.multi_objective:
        pruner: Any = optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                                  n_warmup_steps=cfg.pruner_warmup_epochs)
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(storage=storage, study_name=cfg.study_name, directions=directions,
                                pruner=pruner, load_if_exists=True)
    existing = [d.name.lower() for d in study.directions]
    if existing != directions and len(existing) == len(directions) == 1:
        raise ConfigError(f"tune.direction: study {cfg.study_name} in {redacted_storage(cfg.storage)} "
                          f"{existing[0]}s; expected {existing[0]} or another tune.study_name, got {cfg.direction!r}")
    if existing != directions:
        raise ConfigError(f"tune.objectives: study {cfg.study_name} in {redacted_storage(cfg.storage)} has objectives "
                          f"{', '.join(existing)}; expected those or another tune.study_name, got {', '.join(directions)}")
    seed = cfg.seed + len(study.get_trials(deepcopy=False))
    study.sampler = (optuna.samplers.NSGAIISampler(seed=seed) if cfg.multi_objective
                     else optuna.samplers.TPESampler(seed=seed))
    return study


@dataclass(frozen=True)
class StudyContext:
    """What every trial of one invocation shares. ``dataset`` is an :class:`ml.provenance.DatasetVersion`
    and ``git`` a :class:`ml.provenance.GitInfo`; ``start_tracker`` has the signature of
    :meth:`ml.tracking.mlflow_tracker.MlflowTracker.start`; ``tags`` go on every trial run (git, dataset, flow run);
    ``tracking`` is the :class:`ml.settings.TrackingConfig` the trial runs are recorded with."""

    params: Params
    study_run_id: str
    dataset: Any
    git: Any
    train_frame: Any
    example: np.ndarray
    start_tracker: Callable[..., Any]
    tags: Mapping[str, Any] = field(default_factory=dict)
    tracking: Any = None


def run_trial(trial: Any, ctx: StudyContext) -> float | list[float]:
    """The objective: one training in a nested MLflow run; the metric at its last epoch, or the
    values of ``tune.objectives`` in their order."""
    import optuna

    tune = ctx.params.tune
    cfg = trial_train_config(trial, ctx.params.train, tune)
    tracker = ctx.start_tracker(ctx.tracking, trial_run_name(trial.number, cfg),
                                {**ctx.tags, TRIAL_TAG: trial.number, STUDY_TAG: tune.study_name},
                                parent_run_id=ctx.study_run_id, kind="trial", system_metrics=False)
    trial.set_user_attr(RUN_ID_ATTR, tracker.run_id)
    status = "FAILED"
    try:
        value = _train_trial(trial, cfg, tracker, ctx)
        status = "FINISHED"
        return value
    except optuna.TrialPruned:
        status = "FINISHED"
        raise
    except BaseException as exc:
        tracker.set_tags({STATE_TAG: "FAIL", "error": f"{exc.__class__.__name__}: {exc}"[:5000]})
        raise
    finally:
        tracker.close(status)


def _train_trial(trial: Any, cfg: TrainConfig, tracker: Any, ctx: StudyContext) -> float | list[float]:
    from ml.train.stage import train

    tune, processed = ctx.params.tune, ctx.params.data.processed_dir
    tracker.log_params({**flatten(cfg, "train."), "data.processed_dir": processed,
                        "tune.study_name": tune.study_name, "tune.metric": tune.metric})
    tracker.log_dataset(ctx.train_frame, ctx.dataset, "training")
    hook = PruningHook(trial, tune.metric)
    result = train(cfg, processed, tracker, [] if tune.multi_objective else [hook])
    tracker.log_artifact(cfg.metrics_file, METRICS_ARTIFACTS)
    if hook.pruned_at is not None:
        tracker.set_tags({STATE_TAG: "PRUNED", "pruned_after_epoch": hook.pruned_at})
        shutil.rmtree(cfg.model_dir, ignore_errors=True)  # a pruned trial's weights are never used
        hook.raise_if_pruned()
    values = measure(objectives_of(tune), result.final_metrics, result.model, cfg.model_dir, ctx.example,
                     tune.latency_batch_size)
    value = list(values.values()) if tune.multi_objective else values[tune.metric]
    if tune.multi_objective:  # the measured ones (latency, size) beside the epoch metrics
        tracker.log_metrics({k: v for k, v in values.items() if k not in result.final_metrics}, step=result.state.epoch)
    if not all(math.isfinite(v) for v in values.values()):
        tracker.set_tags({STATE_TAG: "FAIL", "error": ", ".join(f"{k} is {v}" for k, v in values.items()
                                                                if not math.isfinite(v))})
        return value  # Optuna records a non-finite value as a failed trial
    leading = leads_study(trial, values, objectives_of(tune))
    model_uri = tracker.log_model(result.model, ctx.example) if leading else None
    tracker.log_artifacts(cfg.model_dir, WEIGHTS_ARTIFACTS)
    summary = {"run_id": tracker.run_id, "model_uri": model_uri, "experiment": ctx.tracking.experiment,
               "run_url": tracker.url, "parent_run_id": ctx.study_run_id, "dataset": ctx.dataset.to_dict(),
               "git": {"commit": ctx.git.commit, "branch": ctx.git.branch, "dirty": ctx.git.dirty},
               "resume": "", "stopped_early": result.state.stop_reason, "final": result.final_metrics}
    atomic_write_json(cfg.run_file, summary)
    trial.set_user_attr(SUMMARY_ATTR, summary)
    tracker.set_tags({STATE_TAG: "COMPLETE", "optuna_value": value, MODEL_LOGGED_TAG: str(leading).lower()})
    return value


def dominates(a: Sequence[float], b: Sequence[float], objectives: Sequence[Objective]) -> bool:
    """Whether values ``a`` are at least as good as ``b`` in every objective and better in one."""
    signs = [1.0 if o.direction == "max" else -1.0 for o in objectives]
    at_least = all(s * x >= s * y for s, x, y in zip(signs, a, b))
    return at_least and any(s * x > s * y for s, x, y in zip(signs, a, b))


def leads_study(trial: Any, values: Mapping[str, float], objectives: Sequence[Objective]) -> bool:
    """Whether a trial about to complete with ``values`` is dominated by no completed trial of its
    study (single objective: none is strictly better), every invocation's and every worker's.

    Only such a trial logs its MLflow model, as Lightning's ``save_top_k`` keeps only the best
    checkpoints: the adopted trial (Optuna's best, or a trial of the Pareto front picked by
    ``tune.select``) was dominated by no completed trial when it completed, so it always has its
    model. Two trials completing at once may both log one; none that could be adopted goes without.
    """
    import optuna

    mine = [values[o.name] for o in objectives]
    done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return not any(dominates(other.values, mine, objectives) for other in done)


@dataclass(frozen=True)
class StudyOutcome:
    """A study after one invocation: its best trial (of all invocations) and the trial counts."""

    study_name: str
    best_number: int
    best_value: float
    best_params: dict[str, Any]
    best_run_id: str
    best_summary: dict[str, Any]
    new_trials: list[int]
    states: dict[str, int]
    best_values: dict[str, float] = field(default_factory=dict)  # every objective's value (best_value: the rule's)

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study_name, "best_trial": self.best_number, "best_value": self.best_value,
                "best_params": self.best_params, "best_run_id": self.best_run_id, "new_trials": self.new_trials,
                "trial_states": self.states, "best_values": self.best_values}


def run_study(study: Any, ctx: StudyContext, study_run: Any,
              optimize: Callable[[Any, StudyContext], None] | None = None) -> StudyOutcome:
    """Runs ``tune.n_trials`` more trials (or until ``tune.timeout_s``), then records the best trial,
    the trial counts and Optuna's plots on ``study_run``. ``optimize(study, ctx)`` runs the trials
    elsewhere (:meth:`ml.tune.workers.WorkerPool.optimize`: in worker processes); by default they run here."""
    import optuna

    tune = ctx.params.tune
    before = {t.number for t in study.get_trials(deepcopy=False)}
    if optimize is not None:
        optimize(study, ctx)
    else:
        study.optimize(lambda trial: run_trial(trial, ctx), n_trials=tune.n_trials, timeout=tune.timeout_s)
    trials = study.get_trials(deepcopy=False)
    states = dict(Counter(t.state.name for t in trials))
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise PipelineError(f"tune: no trial of study {tune.study_name} completed "
                            f"({', '.join(f'{n} {s.lower()}' for s, n in sorted(states.items()))}); nothing to evaluate")
    names = [o.name for o in objectives_of(tune)]
    try:
        best = adopted_trial(study, tune)
    except PipelineError:  # no trial meets tune.select: the report shows the front to choose a rule from
        write_study_report(study, tune.report_dir, seed=tune.seed, objective_names=names)
        raise
    best_values = dict(zip(names, best.values))
    if not best.user_attrs.get(SUMMARY_ATTR, {}).get("model_uri"):
        raise PipelineError(f"tune: best trial {best.number} of study {tune.study_name} has no trained model "
                            f"recorded (user attr {SUMMARY_ATTR}); use another tune.study_name")
    outcome = StudyOutcome(tune.study_name, best.number, float(best_values[select_rule(tune).target]),
                           decode_params(tune.search_space, best.params),
                           best.user_attrs[RUN_ID_ATTR], dict(best.user_attrs[SUMMARY_ATTR]),
                           sorted(t.number for t in trials if t.number not in before), states, best_values)
    record_outcome(study, outcome, study_run, tune)
    return outcome


def record_outcome(study: Any, outcome: StudyOutcome, study_run: Any, tune: TuneConfig) -> None:
    """Best (adopted) trial as tags and ``best.*`` params, trial counts and the adopted trial's
    objective values as metrics, the study report (:func:`ml.tune.plots.write_study_report`) in
    ``tune.report_dir`` and as artifacts under ``optuna/``."""
    study_run.set_tags({"best_trial_number": outcome.best_number, "best_trial_run_id": outcome.best_run_id,
                        "best_value": f"{outcome.best_value:.6g}", "new_trials": ",".join(map(str, outcome.new_trials))})
    study_run.log_params({f"best.{k}": v for k, v in outcome.best_params.items()})
    study_run.log_metrics({f"trials_{state.lower()}": float(n) for state, n in outcome.states.items()}, step=0)
    study_run.log_metrics({f"best_{k}": v for k, v in (outcome.best_values or {tune.metric: outcome.best_value}).items()},
                          step=0)
    if tune.multi_objective:
        study_run.set_tags({"select_rule": str(select_rule(tune)),
                            "pareto_trials": ",".join(str(t.number) for t in study.best_trials)})
    names = [o.name for o in objectives_of(tune)]
    for path in write_study_report(study, tune.report_dir, seed=tune.seed, objective_names=names,
                                   adopted=outcome.best_number):
        study_run.log_artifact(path, "optuna")


# -- the best trial becomes the trained model -----------------------------------------------------------

def adopt_best_trial(outcome: StudyOutcome, train_cfg: TrainConfig, tune: TuneConfig, client: Any) -> dict[str, Any]:
    """Copies the best trial's weights to ``train.model_dir`` and its per-epoch metrics to
    ``train.metrics_file``, and writes its summary to ``train.run_file``; returns the summary.

    The files come from the trial's directory when it holds that trial's run (its ``run.json`` names
    the run); otherwise, as for a trial that ran on another machine against a shared study, from the
    trial run's artifacts through ``client``.
    """
    local = trial_dir(tune, outcome.best_number)
    run_id = outcome.best_run_id
    run_file = local / "run.json"
    is_local = run_file.is_file() and json.loads(run_file.read_text()).get("run_id") == run_id

    def fill_model_dir(tmp: Path) -> None:
        if is_local:
            shutil.copytree(local / "model", tmp, dirs_exist_ok=True)
            return
        with tempfile.TemporaryDirectory() as download:
            shutil.copytree(client.download_artifacts(run_id, WEIGHTS_ARTIFACTS, download), tmp, dirs_exist_ok=True)

    replace_dir(train_cfg.model_dir, fill_model_dir)
    if is_local:
        history = json.loads((local / "metrics.json").read_text())
    else:
        with tempfile.TemporaryDirectory() as download:
            fetched = client.download_artifacts(run_id, f"{METRICS_ARTIFACTS}/metrics.json", download)
            history = json.loads(Path(fetched).read_text())
    atomic_write_json(train_cfg.metrics_file, history)
    atomic_write_json(train_cfg.run_file, outcome.best_summary)
    return outcome.best_summary
