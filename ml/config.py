"""params.yaml, read into one frozen dataclass per section.

Each stage reads only its own section. Unknown keys, missing keys, wrong types and values out of
range all raise :class:`ConfigError` with one line that names the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ml.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


def _check(check: str, doc: str, **extra: Any) -> dict[str, Any]:
    """Field metadata: a range/choice check (see :func:`_validate_value`) and a one-line doc."""
    return {"check": check, "doc": doc, **extra}


@dataclass(frozen=True)
class DataConfig:
    """prepare: where the raw data comes from and how it is split."""

    source: str = field(metadata=_check("nonempty", "`sklearn:digits`, or a path to a .csv/.parquet file"))
    label_column: str = field(metadata=_check("nonempty", "name of the label column in a CSV/Parquet source"))
    raw_dir: str = field(metadata=_check("nonempty", "directory the raw dataset is materialized into (DVC out)"))
    processed_dir: str = field(metadata=_check("nonempty", "directory of train/val/test Parquet splits (DVC out)"))
    test_size: float = field(metadata=_check("open_unit", "fraction of rows held out for test, in (0, 1)"))
    val_size: float = field(metadata=_check("open_unit", "fraction of rows held out for validation, in (0, 1)"))
    seed: int = field(metadata=_check("nonneg", "seed of the stratified split"))

    def __post_init__(self) -> None:
        if self.test_size + self.val_size >= 1:
            raise ConfigError("data.test_size + data.val_size: expected a sum below 1, "
                              f"got {self.test_size + self.val_size:g}")


@dataclass(frozen=True)
class ValidateConfig:
    """validate: the data contract every split must meet (a Great Expectations suite)."""

    min_rows: int = field(metadata=_check("positive", "minimum row count of each split"))
    num_features: int | None = field(metadata=_check("positive_or_none", "expected feature count, or null to accept the prepared schema"))
    num_classes: int | None = field(metadata=_check("positive_or_none", "expected class count (labels 0..n-1), or null to accept the prepared schema"))
    feature_min: float | None = field(metadata=_check("any", "lowest allowed feature value, or null for no bound"))
    feature_max: float | None = field(metadata=_check("any", "highest allowed feature value, or null for no bound"))
    min_class_fraction: float = field(metadata=_check("unit", "smallest share of rows any class may have, in [0, 1]"))
    max_class_fraction: float = field(metadata=_check("unit", "largest share of rows any class may have, in [0, 1]"))
    report: str = field(metadata=_check("nonempty", "path of the JSON validation report (DVC out)"))

    def __post_init__(self) -> None:
        if self.feature_min is not None and self.feature_max is not None and self.feature_min > self.feature_max:
            raise ConfigError("validate.feature_min: expected a value <= validate.feature_max, "
                              f"got {self.feature_min} > {self.feature_max}")
        if self.min_class_fraction > self.max_class_fraction:
            raise ConfigError("validate.min_class_fraction: expected a value <= validate.max_class_fraction")


@dataclass(frozen=True)
class TrainConfig:
    """train: the model, the optimizer and the loop."""

    hidden_sizes: tuple[int, ...] = field(metadata=_check("positive_items", "widths of the MLP's hidden layers, e.g. [128, 64]"))
    dropout: float = field(metadata=_check("half_open_unit", "dropout probability after each hidden layer, in [0, 1)"))
    lr: float = field(metadata=_check("positive", "AdamW learning rate, > 0"))
    weight_decay: float = field(metadata=_check("nonneg", "AdamW weight decay, >= 0"))
    batch_size: int = field(metadata=_check("positive", "samples per optimizer step"))
    epochs: int = field(metadata=_check("positive", "passes over the training split"))
    seed: int = field(metadata=_check("nonneg", "seed of weights init, dropout and shuffling"))
    device: str = field(metadata=_check("choice", "where to train", choices=("auto", "cpu", "cuda")))
    model_dir: str = field(metadata=_check("nonempty", "directory of the trained weights (DVC out)"))
    run_file: str = field(metadata=_check("nonempty", "JSON file naming the MLflow run of this training (DVC out)"))
    metrics_file: str = field(metadata=_check("nonempty", "per-epoch metrics as JSON lines (DVC plot)"))


@dataclass(frozen=True)
class EvaluateConfig:
    """evaluate: test-set metrics, written as DVC metrics/plots and logged to the run."""

    metrics_file: str = field(metadata=_check("nonempty", "JSON test metrics (DVC metrics)"))
    predictions_file: str = field(metadata=_check("nonempty", "CSV of actual/predicted labels (DVC confusion plot)"))
    confusion_png: str = field(metadata=_check("nonempty", "rendered confusion matrix (DVC image plot)"))


@dataclass(frozen=True)
class RegisterConfig:
    """register: the quality gate and the registered model the version goes to."""

    model_name: str = field(metadata=_check("nonempty", "registered model name in the MLflow registry"))
    min_test_accuracy: float = field(metadata=_check("unit", "the version is registered only at or above this test accuracy"))
    champion_min_delta: float = field(metadata=_check("any", "challenger test accuracy minus the champion's, on the same test set, must reach this"))
    output: str = field(metadata=_check("nonempty", "JSON record of the registered version (DVC out)"))


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: where runs and the registry live, and what the tracker records besides metrics."""

    uri: str = field(metadata=_check("nonempty", "tracking URI: sqlite:///mlflow.db (embedded) or http://host:port"))
    experiment: str = field(metadata=_check("nonempty", "MLflow experiment name"))
    artifact_root: str = field(metadata=_check("nonempty", "artifact root for new experiments on a local store"))
    flush_interval_s: float = field(metadata=_check("positive", "seconds between background metric flushes, > 0"))
    spool_dir: str = field(metadata=_check("nonempty", "directory of the append-only spool used while the store is unreachable"))
    system_metrics_interval_s: float = field(metadata=_check("positive", "seconds between system metric samples, > 0"))
    histogram_every_steps: int | None = field(metadata=_check("positive_or_none", "steps between weight/gradient histograms, or null for none"))
    confusion_every_epoch: bool = field(metadata=_check("any", "log a validation confusion matrix after every epoch"))
    progress: str = field(metadata=_check("choice", "training progress bar", choices=("auto", "on", "off")))


@dataclass(frozen=True)
class AnomalyConfig:
    """train: what counts as an anomaly in training, and what to do about one."""

    action: str = field(metadata=_check("choice", "on an anomaly", choices=("warn", "stop")))
    loss_spike_window: int = field(metadata=_check("positive", "steps in the robust z-score window of the loss"))
    loss_spike_zscore: float = field(metadata=_check("positive", "robust z-score above which a loss is a spike, > 0"))
    max_grad_norm: float | None = field(metadata=_check("positive_or_none", "gradient norm above which it is exploding, or null"))
    patience: int | None = field(metadata=_check("positive_or_none", "evaluations without improvement that count as a plateau, or null"))
    patience_metric: str = field(metadata=_check("nonempty", "validation metric watched for improvement"))
    patience_mode: str = field(metadata=_check("choice", "direction of improvement", choices=("min", "max")))


@dataclass(frozen=True)
class CheckpointConfig:
    """train: tiered checkpoints (see docs in ml/checkpoint/manager.py)."""

    dir: str = field(metadata=_check("nonempty", "root of the training/milestone/production tiers"))
    every_steps: int | None = field(metadata=_check("positive_or_none", "optimizer steps between training checkpoints, or null"))
    every_seconds: float | None = field(metadata=_check("positive_or_none", "seconds between training checkpoints, or null"))
    keep_last: int = field(metadata=_check("at_least_2", "training checkpoints kept, >= 2"))
    monitor: tuple[str, ...] = field(metadata=_check("monitor_items", "milestone metrics as metric:min or metric:max"))
    compress: str = field(metadata=_check("choice", "compression of the training tier", choices=("none", "zstd")))
    checksum: str = field(metadata=_check("choice", "per-file digest of the training tier in the manifest",
                                          choices=("sha256", "crc32")))
    resume: bool = field(metadata=_check("any", "resume from the newest valid training checkpoint of the same configuration"))
    s3_bucket: str | None = field(metadata=_check("any", "S3 bucket mirrored after each local commit, or null"))
    s3_prefix: str = field(metadata=_check("any", "key prefix inside the bucket"))
    s3_endpoint_url: str | None = field(metadata=_check("any", "S3-compatible endpoint URL, or null for AWS"))


@dataclass(frozen=True)
class ServeConfig:
    """mlops serve: the HTTP endpoint that serves the champion."""

    endpoint: str = field(metadata=_check("nonempty", "endpoint name (lineage and deployment records use it)"))
    host: str = field(metadata=_check("nonempty", "address to bind"))
    port: int = field(metadata=_check("nonneg", "port to bind (0: any free port)"))
    alias: str = field(metadata=_check("nonempty", "registry alias to serve and follow"))
    poll_interval_s: float = field(metadata=_check("positive", "seconds between checks of the alias, > 0"))
    max_body_bytes: int = field(metadata=_check("positive", "largest accepted request body; larger gets 413"))
    records_dir: str = field(metadata=_check("nonempty", "directory of deployment records"))


@dataclass(frozen=True)
class PromotionConfig:
    """promotion flow: wait for an approval in the registry, then move the alias."""

    alias: str = field(metadata=_check("nonempty", "alias a promoted version takes"))
    timeout_s: float = field(metadata=_check("positive", "seconds to wait for an approval before giving up, > 0"))
    poll_interval_s: float = field(metadata=_check("positive", "seconds between checks of the approval status, > 0"))
    after_training: bool = field(metadata=_check("any", "the training flow ends by starting the promotion flow"))


# TrainConfig keys a study may search, and whether a {low, high, log} range suits them (floats);
# the others take a list of choices.
TUNABLE = {"lr": True, "weight_decay": True, "dropout": True, "batch_size": False, "hidden_sizes": False}
# The monitored metric and the direction in which it improves.
TUNE_METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}


@dataclass(frozen=True)
class SearchParam:
    """One dimension of a search space: a float range ``low``..``high`` (log scale when ``log``), or
    ``choices`` (values of the train key, lists included)."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()


def _search_param(name: str, spec: Any) -> SearchParam:
    """Checks one entry of ``tune.space`` against the train key it searches."""
    key = f"tune.space.{name}"
    if name not in TUNABLE:
        raise ConfigError(f"{key}: unknown parameter; expected one of {', '.join(TUNABLE)}")
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: expected a mapping {{low, high, log}} or {{choices}}, got {spec!r}")
    train_field = TrainConfig.__dataclass_fields__[name]
    tp = typing.get_type_hints(TrainConfig)[name]
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise ConfigError(f"{key}: expected `choices` alone, got keys {', '.join(sorted(map(str, spec)))}")
        raw = spec["choices"]
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{key}.choices: expected a non-empty list of values, got {raw!r}")
        choices = []
        for i, value in enumerate(raw):
            value = _coerce(f"{key}.choices[{i}]", value, tp)
            _validate_value(f"{key}.choices[{i}]", value, dict(train_field.metadata))
            choices.append(value)
        if len(set(choices)) != len(choices):
            raise ConfigError(f"{key}.choices: expected distinct values, got {raw!r}")
        return SearchParam(name, choices=tuple(choices))
    if not TUNABLE[name]:
        floats = ", ".join(k for k, is_float in TUNABLE.items() if is_float)
        raise ConfigError(f"{key}: expected {{choices: [...]}} (a range suits only {floats}), got {spec!r}")
    unknown = sorted(set(spec) - {"low", "high", "log"})
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key; expected low, high, log (or choices alone)")
    for bound in ("low", "high"):
        if bound not in spec:
            raise ConfigError(f"{key}.{bound}: missing key (the range's {'lower' if bound == 'low' else 'upper'} bound)")
    low = _coerce(f"{key}.low", spec["low"], float)
    high = _coerce(f"{key}.high", spec["high"], float)
    for bound, value in (("low", low), ("high", high)):
        _validate_value(f"{key}.{bound}", value, dict(train_field.metadata))
    if not low < high:
        raise ConfigError(f"{key}.high: expected a value above {key}.low, got {high:g} <= {low:g}")
    log = _coerce(f"{key}.log", spec.get("log", False), bool)
    if log and low <= 0:
        raise ConfigError(f"{key}.log: expected false when low is {low:g} (a log scale needs low > 0)")
    return SearchParam(name, low=low, high=high, log=log)


@dataclass(frozen=True)
class TuneConfig:
    """tune: an Optuna study over train's hyperparameters; each trial trains with ``train`` but for
    the keys in ``space``, as an MLflow run nested in the study's run."""

    n_trials: int = field(metadata=_check("positive", "trials each invocation runs; a study found in storage resumes and grows by this many"))
    timeout_s: float | None = field(metadata=_check("positive_or_none", "seconds after which no new trial starts, or null for no limit"))
    seed: int = field(metadata=_check("nonneg", "seed of the TPE sampler"))
    metric: str = field(metadata=_check("choice", "validation metric a trial is scored by, at its last epoch",
                                        choices=tuple(TUNE_METRICS)))
    direction: str = field(metadata=_check("choice", "whether the study maximizes or minimizes the metric",
                                           choices=("maximize", "minimize")))
    pruner: str = field(metadata=_check("choice", "stops unpromising trials early", choices=("median", "none")))
    pruner_warmup_epochs: int = field(metadata=_check("nonneg", "epochs a trial runs before it may be pruned"))
    pruner_startup_trials: int = field(metadata=_check("nonneg", "trials that complete before any is pruned"))
    storage: str = field(metadata=_check("url", "an Optuna RDB URL such as sqlite:///optuna.db or postgresql://host/db"))
    study_name: str = field(metadata=_check("name", "study name: letters, digits, '.', '_' or '-'"))
    trials_dir: str = field(metadata=_check("nonempty", "directory of each trial's weights, run file and metrics"))
    space: dict = field(metadata=_check("any", "train keys searched: {low, high, log} for floats, {choices: [...]} otherwise"))

    def __post_init__(self) -> None:
        if not self.space:
            raise ConfigError("tune.space: expected at least one train key to search, got {}")
        expected = TUNE_METRICS[self.metric]
        if self.direction != expected:
            raise ConfigError(f"tune.direction: expected {expected} for tune.metric {self.metric}, got {self.direction!r}")
        for name, spec in self.space.items():
            _search_param(str(name), spec)

    @property
    def search_space(self) -> tuple[SearchParam, ...]:
        """``space`` as checked search dimensions, in the order params.yaml lists them."""
        return tuple(_search_param(str(name), spec) for name, spec in self.space.items())


@dataclass(frozen=True)
class Params:
    """The whole params.yaml."""

    data: DataConfig
    validate: ValidateConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    register: RegisterConfig
    tracking: TrackingConfig
    anomaly: AnomalyConfig
    checkpoint: CheckpointConfig
    serve: ServeConfig
    promotion: PromotionConfig
    tune: TuneConfig


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Checks ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if value is None:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got null")
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _validate_value(key: str, value: Any, meta: dict[str, Any]) -> None:
    check = meta["check"]
    if value is None:
        return
    bad = {
        "nonempty": lambda v: not str(v).strip(),
        "positive": lambda v: not v > 0,
        "positive_or_none": lambda v: not v > 0,
        "nonneg": lambda v: v < 0,
        "unit": lambda v: not 0 <= v <= 1,
        "open_unit": lambda v: not 0 < v < 1,
        "half_open_unit": lambda v: not 0 <= v < 1,
        "positive_items": lambda v: len(v) == 0 or any(x <= 0 for x in v),
        "choice": lambda v: v not in meta["choices"],
        "at_least_2": lambda v: v < 2,
        "url": lambda v: "://" not in v or v.startswith("://"),
        "name": lambda v: not v or any(not (c.isalnum() or c in "._-") for c in v),
        "monitor_items": lambda v: any(len(s.split(":")) != 2 or not s.split(":")[0]
                                       or s.split(":")[1] not in ("min", "max") for s in v),
        "any": lambda v: False,
    }[check](value)
    if bad:
        expected = meta["doc"]
        if check == "choice":
            expected = "one of " + ", ".join(meta["choices"])
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def build_section(cls: type, section: str, raw: Any) -> Any:
    """Builds the dataclass ``cls`` from the mapping ``raw`` read at ``section``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown key; expected one of {', '.join(names)}")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ConfigError(f"{section}.{missing[0]}: missing key ({cls.__dataclass_fields__[missing[0]].metadata['doc']})")
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{section}.{f.name}"
        value = _coerce(key, raw[f.name], hints[f.name])
        _validate_value(key, value, dict(f.metadata))
        values[f.name] = value
    return cls(**values)


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Reads and checks the whole params file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    hints = typing.get_type_hints(Params)
    names = [f.name for f in dataclasses.fields(Params)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; expected one of {', '.join(names)}")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ConfigError(f"{missing[0]}: missing section")
    return Params(**{n: build_section(hints[n], n, raw[n]) for n in names})


def section_keys(cls: type, section: str) -> list[str]:
    """The dotted params keys a section's dataclass reads (what dvc.yaml must declare)."""
    return [f"{section}.{f.name}" for f in dataclasses.fields(cls)]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A dataclass tree as flat ``section.key`` -> value (for logging as run params)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out
