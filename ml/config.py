"""params.yaml (what DVC tracks: everything that changes a stage's outputs), read into one frozen
pydantic model per section.

Each stage reads only its own section. Unknown keys, missing keys, wrong types and values out of
range all raise :class:`ConfigError` with one line that names the key, the value and what was
expected (:func:`config_error` turns a pydantic ``ValidationError`` into that line; runtime
settings in :mod:`ml.settings` use it too). Numbers are read in pydantic's lax mode, so ``1e-6``,
which YAML reads as a string, is a float; booleans are never numbers.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from ml.errors import ConfigError
from ml.metrics import direction, optuna_direction

DEFAULT_PARAMS = Path("params.yaml")


def _not_bool(kind: str) -> BeforeValidator:
    """YAML's ``true`` is not a number (pydantic's lax mode would read it as 1)."""

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticCustomError(f"{kind}_type", f"Input should be a valid {kind}")
        return value

    return BeforeValidator(check)


def _yaml_off(value: Any) -> Any:
    """YAML 1.1 reads an unquoted ``off`` as false: for a switch whose choices include "off", it is that."""
    return "off" if value is False else value


YamlOff = BeforeValidator(_yaml_off)

# Numbers: pydantic's lax mode (an int is a float, "1e-6" is a float), never a boolean.
Int = Annotated[int, _not_bool("int")]
Float = Annotated[float, _not_bool("float")]
NonEmpty = Annotated[str, Field(pattern=r"\S")]


class Section(BaseModel):
    """A params or settings section: immutable, unknown keys refused, finite numbers only."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class DataConfig(Section):
    """prepare: where the raw data comes from and how it is split."""

    source: NonEmpty = Field(description="`sklearn:digits`, or a path to a .csv/.parquet file")
    label_column: NonEmpty = Field(description="name of the label column in a CSV/Parquet source")
    raw_dir: NonEmpty = Field(description="directory the raw dataset is materialized into (DVC out)")
    processed_dir: NonEmpty = Field(description="directory of train/val/test Parquet splits (DVC out)")
    test_size: Float = Field(gt=0, lt=1, description="fraction of rows held out for test, in (0, 1)")
    val_size: Float = Field(gt=0, lt=1, description="fraction of rows held out for validation, in (0, 1)")
    seed: Int = Field(ge=0, description="seed of the stratified split")

    @model_validator(mode="after")
    def _sizes(self) -> DataConfig:
        if self.test_size + self.val_size >= 1:
            raise ValueError("data.test_size + data.val_size: expected a sum below 1, "
                             f"got {self.test_size + self.val_size:g}")
        return self


class ContractConfig(Section):
    """prepare, validate: the data contract in git (a GX suite with the schema and the label mapping)."""

    path: NonEmpty = Field(description="the contract file, e.g. gx/expectations/digits.json (`mlops data contract init`)")
    allow_missing_classes: bool = Field(description="a class the contract lists but the data lacks warns instead of failing")


class ValidateConfig(Section):
    """validate: the gate's checks beyond the contract's own (class shares), and its report."""

    min_class_fraction: Float = Field(ge=0, le=1, description="smallest share of rows any class may have, in [0, 1]")
    max_class_fraction: Float = Field(ge=0, le=1, description="largest share of rows any class may have, in [0, 1]")
    report: NonEmpty = Field(description="path of the JSON validation report (DVC out)")

    @model_validator(mode="after")
    def _bounds(self) -> ValidateConfig:
        if self.min_class_fraction > self.max_class_fraction:
            raise ValueError("validate.min_class_fraction: expected a value <= validate.max_class_fraction, "
                             f"got {self.min_class_fraction} > {self.max_class_fraction}")
        return self


class DriftConfig(Section):
    """validate: drift of each feature (PSI, KS) and of the label shares from a reference."""

    reference: Literal["champion", "contract"] = Field(description="champion: its training split when the DVC cache has it, else the contract's reference statistics; contract: always those")
    psi_warn: Float = Field(ge=0, description="a PSI at or above this is recorded as a warning")
    psi_fail: Float = Field(gt=0, description="a PSI at or above this fails the gate")
    ks_pvalue: Float = Field(ge=0, le=1, description="a KS p-value below this is recorded as a warning, in [0, 1]")
    report: NonEmpty = Field(description="JSON drift report (DVC plot)")
    plot: NonEmpty = Field(description="PNG of per-feature PSI and the worst histograms (DVC plot)")

    @model_validator(mode="after")
    def _thresholds(self) -> DriftConfig:
        if self.psi_warn > self.psi_fail:
            raise ValueError(f"drift.psi_warn: expected a value <= drift.psi_fail, got {self.psi_warn} > {self.psi_fail}")
        return self


class MemoryGuardConfig(Section):
    """train.memory: the memory guard (ml.train.memory). Limits are fractions of the machine's
    memory: physical RAM for the process's RSS on the CPU, the device's memory for what torch has
    reserved on CUDA."""

    check_every_steps: Int | None = Field(50, gt=0, description="optimizer steps between memory samples (RSS, system memory; CUDA allocated/reserved/peak), logged as metrics, or null: no guard")
    soft_limit: Float = Field(0.85, gt=0, le=1, description="a fraction in (0, 1] of memory above which the guard collects garbage (and empties the CUDA cache), logged as an event")
    hard_limit: Float = Field(0.95, gt=0, le=1, description="a fraction in (0, 1] of memory above which (or on a CUDA out-of-memory error) the micro-batch is halved and the micro-batches per step doubled, the same samples per optimizer step")

    @model_validator(mode="after")
    def _limits(self) -> MemoryGuardConfig:
        if self.soft_limit > self.hard_limit:
            raise ValueError(f"train.memory.soft_limit: expected a value <= train.memory.hard_limit, "
                             f"got {self.soft_limit:g} > {self.hard_limit:g}")
        return self


# The metrics every epoch records (ml.train.loop.fit), that early stopping and restore_best may watch.
EPOCH_METRICS = ("val_loss", "val_accuracy", "train_loss", "train_accuracy")


class DistributedConfig(Section):
    """train.distributed: data-parallel training, the train stage launching itself under torchrun
    (ml.train.distributed)."""

    nproc_per_node: Int = Field(1, gt=0, description="processes (ranks) training together on this machine, each on its own shard of every epoch with DistributedDataParallel; 1: one process, no torchrun; at most the CPU cores (gloo) or CUDA devices (nccl)")
    backend: Literal["gloo", "nccl"] | None = Field(None, description="torch.distributed backend: gloo (CPU) or nccl (CUDA); null: nccl on CUDA, gloo on the CPU")


class TrainConfig(Section):
    """train: the model, the optimizer and the loop."""

    hidden_sizes: tuple[Annotated[Int, Field(gt=0)], ...] = Field(min_length=1, description="widths of the MLP's hidden layers, e.g. [128, 64]")
    dropout: Float = Field(ge=0, lt=1, description="dropout probability after each hidden layer, in [0, 1)")
    lr: Float = Field(gt=0, description="AdamW learning rate, > 0")
    weight_decay: Float = Field(ge=0, description="AdamW weight decay, >= 0")
    batch_size: Int = Field(gt=0, description="samples per optimizer step")
    epochs: Int = Field(gt=0, description="passes over the training split")
    seed: Int = Field(ge=0, description="seed of weights init, dropout and shuffling")
    device: Literal["auto", "cpu", "cuda"] = Field(description="where to train")
    model_dir: NonEmpty = Field(description="directory of the trained weights (DVC out)")
    run_file: NonEmpty = Field(description="JSON file naming the MLflow run of this training (DVC out)")
    metrics_file: NonEmpty = Field(description="per-epoch metrics as JSON lines (DVC plot)")
    early_stopping_patience: Int | None = Field(None, gt=0, description="epochs in a row without an improvement of early_stopping_metric that end training, or null: every epoch runs")
    early_stopping_metric: Literal["val_loss", "val_accuracy", "train_loss", "train_accuracy"] = Field("val_loss", description="epoch metric early stopping watches (its direction from ml.metrics)")
    log_every_steps: Int = Field(1, gt=0, description="steps whose loss and grad norm are fetched from the device in one transfer, logged and checked for anomalies together; raise it on a GPU so the device is not synchronized every step (an anomaly stop then lands at the end of its interval)")
    accumulate_steps: Int = Field(1, gt=0, description="batches whose gradients one optimizer step accumulates: the effective batch is batch_size x accumulate_steps; global_step and checkpoints count optimizer steps")
    clip_grad_norm: Float | None = Field(None, gt=0, description="global gradient norm each step's gradients are clipped to (after fp16 unscaling; the norm before clipping is logged), or null: no clipping")
    schedule: Literal["constant", "cosine", "onecycle"] = Field("constant", description="learning-rate schedule over the run's optimizer steps (torch.optim.lr_scheduler), after a linear warmup of warmup_steps; its state is in every training checkpoint")
    warmup_steps: Int = Field(0, ge=0, description="optimizer steps of linear learning-rate warmup (onecycle: its rising phase); fewer than the run's steps")
    max_skipped_steps: Int | None = Field(5, gt=0, description="steps in a row skipped for a non-finite loss or gradients that trigger a rollback to the newest training checkpoint before them (an error once max_rollbacks are spent, or when there is none), or null: never")
    max_rollbacks: Int = Field(3, ge=0, description="rollbacks after a divergence (max_skipped_steps non-finite steps in a row, or a loss spike under anomaly.action: rollback) before training ends with an error, >= 0; 0: the first divergence is the error")
    restore_best: str | None = Field("val_loss:min", description="'metric:direction' of the epoch whose weights are saved, logged and registered at the end (an epoch metric: val_loss, val_accuracy, train_loss, train_accuracy; its direction from ml.metrics), or null: the last epoch's")
    model: Literal["mlp", "cnn", "vit", "factory"] = Field("mlp", description="architecture: mlp (hidden_sizes, dropout), cnn (conv-GroupNorm-GELU blocks), vit (a small vision transformer), or factory (model_factory)")
    model_factory: str | None = Field(None, pattern=r"^[\w.]+:\w+$", description="with model: factory, 'package.module:function' called with (input_shape, num_classes, **model_kwargs) that returns an nn.Module")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the architecture (cnn: channels, groups; vit: patch_size, dim, depth, heads, mlp_ratio) or of the factory")
    input_shape: tuple[Annotated[Int, Field(gt=0)], ...] | None = Field(None, description="the shape a feature row is viewed in, e.g. [1, 8, 8]; null: flat for mlp, a square one-channel image for cnn and vit")
    optimize: Annotated[Literal["off", "basic", "advanced", "max", "auto"], YamlOff] = Field("off", description="preset of the speed switches below (off: none; basic: fused AdamW, cudnn.benchmark; advanced: + bf16 (fp16 on a GPU without bf16), compile default, channels_last for the cnn, TF32 on CUDA; max: + max-autotune, activation checkpointing; auto: precision, compile and memory format measured on the job's model and data before training, the fastest whose loss agrees with fp32 eager, cached next to the checkpoints); an explicit key overrides it")
    precision: Literal["fp32", "bf16", "fp16"] | None = Field(None, description="autocast in the forward pass and evaluation (master weights stay fp32); fp16 uses a GradScaler and needs CUDA; null: from optimize")
    compile: Annotated[Literal["off", "default", "reduce-overhead", "max-autotune"] | None, YamlOff] = Field(None, description="torch.compile mode of the training forward (a failure falls back to eager, recorded); null: from optimize")
    memory_format: Literal["contiguous", "channels_last"] | None = Field(None, description="memory format of a convolutional model's weights and images; null: from optimize")
    activation_checkpointing: bool | None = Field(None, description="recompute the activations of the model's blocks in backward (cnn, vit, a factory module's blocks marked activation_checkpoint_block); null: from optimize")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="data-parallel training under torchrun: ranks and backend")
    loader: Literal["memory", "dataloader", "auto"] = Field("auto", description="where batches come from: memory (the whole split as tensors on the device, a seeded permutation), dataloader (a torch DataLoader streaming the Parquet split's row groups, for splits larger than memory), auto (memory when the split fits memory_budget)")
    memory_budget: Float = Field(0.5, gt=0, le=1, description="a fraction in (0, 1] of the machine's memory (physical RAM or the cgroup limit; the device's memory on CUDA) that a split held whole may take: loader auto takes memory within it, dataloader beyond")
    num_workers: Int = Field(2, ge=0, description="worker processes the dataloader reads row groups in, >= 0 (0: in the training process; more than the cores available: that many, with a warning)")
    pin_memory: bool = Field(True, description="dataloader: batches in page-locked memory for asynchronous copies to a CUDA device (ignored on the CPU)")
    persistent_workers: bool = Field(True, description="dataloader: workers stay alive between epochs")
    prefetch_factor: Int = Field(2, gt=0, description="batches each dataloader worker reads ahead, >= 1")
    memory: MemoryGuardConfig = Field(default_factory=MemoryGuardConfig, description="the memory guard: sampling interval and soft/hard limits")

    @model_validator(mode="after")
    def _model(self) -> TrainConfig:
        if (self.model == "factory") != (self.model_factory is not None):
            raise ValueError("train.model_factory: expected 'package.module:function' exactly when train.model is "
                             f"factory, got {self.model_factory!r} with model {self.model}")
        if self.memory_format == "channels_last" and self.model in ("mlp", "vit"):
            raise ValueError(f"train.memory_format: expected contiguous for the {self.model} (channels_last is for "
                             "convolutional models), got 'channels_last'")
        return self

    @model_validator(mode="after")
    def _restore_best(self) -> TrainConfig:
        if self.restore_best is None:
            return self
        metric, _, mode = self.restore_best.partition(":")
        if metric not in EPOCH_METRICS or mode != direction(metric):
            wanted = ", ".join(f"{m}:{direction(m)}" for m in EPOCH_METRICS)
            raise ValueError(f"train.restore_best: expected one of {wanted} or null, got {self.restore_best!r}")
        if self.early_stopping_patience is not None and metric != self.early_stopping_metric:
            raise ValueError(f"train.restore_best: expected the metric early stopping watches "
                             f"({self.early_stopping_metric}:{direction(self.early_stopping_metric)}), "
                             f"got {self.restore_best!r}")
        return self


class EvaluateConfig(Section):
    """evaluate: test-set metrics, written as DVC metrics/plots and logged to the run."""

    metrics_file: NonEmpty = Field(description="JSON test metrics (DVC metrics)")
    predictions_file: NonEmpty = Field(description="CSV of actual/predicted labels (DVC confusion plot)")
    confusion_png: NonEmpty = Field(description="rendered confusion matrix (DVC image plot)")


class RegisterConfig(Section):
    """register: the quality gate and the registered model the version goes to."""

    model_name: NonEmpty = Field(description="registered model name in the MLflow registry")
    min_test_accuracy: Float = Field(ge=0, le=1, description="the version is registered only at or above this test accuracy, in [0, 1]")
    champion_min_delta: Float = Field(description="challenger test accuracy minus the champion's, on the same test set, must reach this")
    output: NonEmpty = Field(description="JSON record of the registered version (DVC out)")
    allow_breaking_change: bool = Field(description="register a version whose input signature or class list differs from the champion's (recorded on the version and in its approval history)")


class AnomalyConfig(Section):
    """train: what counts as an anomaly in training, and what to do about one."""

    action: Literal["warn", "stop", "rollback"] = Field(description="on an anomaly: warn; stop (ends training cleanly at the anomaly); rollback (a loss spike rolls training back to the newest training checkpoint before it and skips the batches since, as train.max_skipped_steps does; other kinds warn)")
    loss_spike_window: Int = Field(gt=0, description="steps whose log-loss median and MAD are the slow baseline of the loss-spike detector")
    loss_spike_zscore: Float = Field(gt=0, description="robust z-score of the recent log-loss level over the baseline above which the loss spikes, > 0")
    loss_spike_persist: Int = Field(3, gt=0, description="recent steps whose median log-loss is the level: a rise must last about half of them to count")
    loss_spike_min_increase: Float = Field(0.01, ge=0, description="floor in loss units: a level less than this above the baseline's loss is never a spike")
    max_grad_norm: Float | None = Field(gt=0, description="gradient norm above which it is exploding, or null")


# TrainConfig keys a study may search, and whether a {low, high, log} range suits them (floats);
# the others take a list of choices.
TUNABLE = {"lr": True, "weight_decay": True, "dropout": True, "batch_size": False, "hidden_sizes": False}
# Validation metrics a trial may be scored by.
TUNE_METRICS = ("val_accuracy", "val_loss")


class SearchParam(Section):
    """One dimension of a search space: a float range ``low``..``high`` (log scale when ``log``), or
    ``choices`` (values of the train key, lists included)."""

    name: str = Field(description="the train key searched")
    low: float | None = Field(default=None, description="lower bound of a float range")
    high: float | None = Field(default=None, description="upper bound of a float range")
    log: bool = Field(default=False, description="sample the range on a log scale")
    choices: tuple[Any, ...] = Field(default=(), description="values of the train key to choose from")


def _train_value(key: str, name: str, value: Any, as_float: bool = False) -> Any:
    """``value`` checked as the train key ``name`` (its type and constraints), reported at ``key``."""
    info = TrainConfig.model_fields[name]
    try:
        if as_float:
            value = TypeAdapter(Float).validate_python(value)
        return TypeAdapter(Annotated[(float if as_float else info.annotation), *info.metadata]).validate_python(value)
    except ValidationError as exc:
        raise config_error(exc, key=key, description=info.description, raw=value) from None


def _search_param(name: str, spec: Any) -> SearchParam:
    """Checks one entry of ``tune.space`` against the train key it searches."""
    key = f"tune.space.{name}"
    if name not in TUNABLE:
        raise ConfigError(f"{key}: unknown parameter; expected one of {', '.join(TUNABLE)}")
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: expected a mapping {{low, high, log}} or {{choices}}, got {spec!r}")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise ConfigError(f"{key}: expected `choices` alone, got keys {', '.join(sorted(map(str, spec)))}")
        raw = spec["choices"]
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{key}.choices: expected a non-empty list of values, got {raw!r}")
        choices = [_train_value(f"{key}.choices[{i}]", name, value) for i, value in enumerate(raw)]
        if len(set(choices)) != len(choices):
            raise ConfigError(f"{key}.choices: expected distinct values, got {raw!r}")
        return SearchParam(name=name, choices=tuple(choices))
    if not TUNABLE[name]:
        floats = ", ".join(k for k, is_float in TUNABLE.items() if is_float)
        raise ConfigError(f"{key}: expected {{choices: [...]}} (a range suits only {floats}), got {spec!r}")
    unknown = sorted(set(spec) - {"low", "high", "log"})
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key; expected low, high, log (or choices alone)")
    for bound in ("low", "high"):
        if bound not in spec:
            raise ConfigError(f"{key}.{bound}: missing key (the range's {'lower' if bound == 'low' else 'upper'} bound)")
    low = _train_value(f"{key}.low", name, spec["low"], as_float=True)
    high = _train_value(f"{key}.high", name, spec["high"], as_float=True)
    if not low < high:
        raise ConfigError(f"{key}.high: expected a value above {key}.low, got {high:g} <= {low:g}")
    try:
        log = TypeAdapter(bool).validate_python(spec.get("log", False), strict=True)
    except ValidationError:
        raise ConfigError(f"{key}.log: expected bool, got {spec['log']!r}") from None
    if log and low <= 0:
        raise ConfigError(f"{key}.log: expected false when low is {low:g} (a log scale needs low > 0)")
    return SearchParam(name=name, low=low, high=high, log=log)


class TuneConfig(Section):
    """tune: an Optuna study over train's hyperparameters; each trial trains with ``train`` but for
    the keys in ``space``, as an MLflow run nested in the study's run."""

    n_trials: Int = Field(gt=0, description="trials each invocation runs; a study found in storage resumes and grows by this many")
    timeout_s: Float | None = Field(gt=0, description="seconds after which no new trial starts, or null for no limit")
    seed: Int = Field(ge=0, description="seed of the TPE sampler")
    metric: Literal["val_accuracy", "val_loss"] = Field(description="validation metric a trial is scored by, at its last epoch (single-objective study: tune.objectives null)")
    direction: Literal["maximize", "minimize"] = Field(description="whether the study maximizes or minimizes the metric")
    objectives: list[str] | None = Field(None, description="null for a single-objective study on tune.metric, or two or more of val_accuracy, val_loss, latency_ms, param_count, model_size_mb, each as name:max or name:min (NSGA-II, no pruning)")
    select: str | None = Field(None, description="which Pareto trial is adopted: max|min <objective> [where <objective> <op> <number> [and ...]]; null: the first objective's best")
    latency_batch_size: Int = Field(1, gt=0, description="rows of the one request whose prediction time is latency_ms")
    report_dir: NonEmpty = Field("reports/study", description="directory of the study's plots and trial table")
    pruner: Literal["median", "none"] = Field(description="stops unpromising trials early (single-objective studies only)")
    pruner_warmup_epochs: Int = Field(ge=0, description="epochs a trial runs before it may be pruned")
    pruner_startup_trials: Int = Field(ge=0, description="trials that complete before any is pruned")
    storage: str = Field(pattern=r"^[^:/]+://", description="an Optuna RDB URL such as sqlite:///optuna.db or postgresql://host/db")
    study_name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="study name: letters, digits, '.', '_' or '-'")
    trials_dir: NonEmpty = Field(description="directory of each trial's weights, run file and metrics")
    space: dict[str, Any] = Field(description="train keys searched: {low, high, log} for floats, {choices: [...]} otherwise")

    @model_validator(mode="after")
    def _space(self) -> TuneConfig:
        if not self.space:
            raise ValueError("tune.space: expected at least one train key to search, got {}")
        expected = optuna_direction(self.metric)
        if self.direction != expected:
            raise ValueError(f"tune.direction: expected {expected} for tune.metric {self.metric}, got {self.direction!r}")
        for name, spec in self.space.items():
            _search_param(str(name), spec)
        if self.objectives is None and self.select is not None:
            raise ValueError(f"tune.select: expected null without tune.objectives (a single-objective study adopts "
                             f"its best trial), got {self.select!r}")
        return self

    @property
    def search_space(self) -> tuple[SearchParam, ...]:
        """``space`` as checked search dimensions, in the order params.yaml lists them."""
        return tuple(_search_param(str(name), spec) for name, spec in self.space.items())

    @property
    def multi_objective(self) -> bool:
        """Whether the study has ``objectives`` (checked, with ``select``, by :mod:`ml.tune.objectives`
        when the study opens: this module imports nothing of ml.tune, which no other stage depends on)."""
        return self.objectives is not None


# `validate` and `register` are section names that also name (deprecated) BaseModel/ABCMeta
# attributes; a field's value wins on the instance, so pydantic's warning about it is noise.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r'Field name "(validate|register)"', category=UserWarning)

    class Params(Section):
        """The whole params.yaml."""

        data: DataConfig = Field(description="prepare: the raw data and its split")
        contract: ContractConfig = Field(description="prepare, validate: the data contract")
        validate: ValidateConfig = Field(description="validate: the data gate")
        drift: DriftConfig = Field(description="validate: drift from a reference")
        train: TrainConfig = Field(description="train: model, optimizer and loop")
        evaluate: EvaluateConfig = Field(description="evaluate: test-set metrics and plots")
        register: RegisterConfig = Field(description="register: the quality gate")
        anomaly: AnomalyConfig = Field(description="train: anomaly detection")
        tune: TuneConfig = Field(description="tune: the Optuna study")


# -- one line per error -------------------------------------------------------------------------------

_TYPE_NAMES = {"int_type": "int", "int_parsing": "int", "int_from_float": "int", "float_type": "float",
               "float_parsing": "float", "bool_type": "bool", "bool_parsing": "bool", "string_type": "str",
               "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
               "model_attributes_type": "a mapping", "finite_number": "a finite number"}


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def config_error(exc: ValidationError, *, model: type[BaseModel] | None = None, raw: Any = None, key: str = "",
                 description: str | None = None, sections: str = "section") -> ConfigError:
    """The first error of ``exc`` as one line: ``<key>: expected <what>, got <value>``.

    ``model`` (with the ``raw`` mapping it was validated from) names keys and their descriptions;
    without it, ``key`` and ``description`` describe the single value that was validated.
    ``sections`` is what the model's top-level keys are called in messages.
    """
    err = exc.errors()[0]
    loc, kind = tuple(err["loc"]), err["type"]
    parts: list[str] = [key] if key else []
    info, value, cls, depth = None, raw, model, 0
    for part in loc:  # the deepest model field the location reaches, and the raw value there
        if cls is None or not isinstance(part, str) or part not in cls.model_fields:
            break
        info = cls.model_fields[part]
        parts.append(part)
        value = value.get(part) if isinstance(value, dict) else None
        cls, depth = _model_of(info.annotation), depth + 1
    field_key = ".".join(parts)
    rest = loc[depth:]
    full_key = field_key + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest)
    full_key = full_key.lstrip(".")
    what = description if info is None else info.description
    if kind == "extra_forbidden":
        names = ", ".join(cls.model_fields) if cls else ""
        level = sections if depth == 0 and not key else "key"
        return ConfigError(f"{full_key}: unknown {level}; expected one of {names}")
    if kind == "missing":
        if depth == 1 and model is not None and _model_of(info.annotation) is not None:
            return ConfigError(f"{full_key}: missing {sections}")
        return ConfigError(f"{full_key}: missing key ({what})")
    if kind in ("value_error", "assertion_error"):
        return ConfigError(str(err["ctx"]["error"]))
    if kind in _TYPE_NAMES:
        return ConfigError(f"{full_key}: expected {_TYPE_NAMES[kind]}, got {_show(err['input'])}")
    if kind == "literal_error":
        choices = ", ".join(str(c) for c in err["ctx"]["expected"].replace("'", "").replace(" or ", ", ").split(", "))
        return ConfigError(f"{full_key}: expected one of {choices}, got {_show(err['input'])}")
    # A constraint (range, length, pattern): what the key means, and the whole value it was given.
    shown = value if model is not None and value is not None else (raw if key and model is None else err["input"])
    return ConfigError(f"{field_key or full_key}: expected {what or err['msg']}, got {_show(shown)}")


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML mapping from ``path``; ``what`` names the file in errors (``params file``)."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    return raw


def build_section(cls: type[BaseModel], section: str, raw: Any) -> Any:
    """Builds the section model ``cls`` from the mapping ``raw`` read at ``section``."""
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise config_error(exc, model=cls, raw=raw, key=section) from None


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Reads and checks the whole params file."""
    raw = read_yaml(Path(path), "params file")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise config_error(exc, model=Params, raw=raw) from None


def section_keys(cls: type[BaseModel], section: str) -> list[str]:
    """The dotted keys a section model reads (what dvc.yaml must declare for its stage)."""
    return [f"{section}.{name}" for name in cls.model_fields]


def flatten(obj: BaseModel, prefix: str = "") -> dict[str, Any]:
    """A model tree as flat ``section.key`` -> value (for logging as run params); tuples as lists."""
    out: dict[str, Any] = {}
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(flatten(value, key + "."))
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out
