"""Runtime settings: where things run, which never changes what a stage produces.

params.yaml is what DVC tracks, so a key there re-runs the stages that list it when it changes.
Tracking (URI, buffering, spool, progress), checkpoint storage, serving, promotion timing, the
MLflow server of ``mlops up`` (its database, artifact store, interface and authentication), the
DVC remote of the data and the workspaces of flow runs live here instead, read with
pydantic-settings from, highest first:

1. ``MLOPS_<SECTION>__<KEY>`` environment variables (``MLOPS_TRACKING__PROGRESS=off``; lists and
   mappings as JSON),
2. a YAML file: ``settings.yaml`` in the working directory (optional), or the file named by
   ``MLOPS_SETTINGS`` or passed to :func:`load_settings` (then it must exist),
3. the defaults below.

Errors are one line, like params errors, and name where the bad value came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ml.config import Float, Int, NonEmpty, Section, config_error, read_yaml
from ml.errors import ConfigError

DEFAULT_SETTINGS = Path("settings.yaml")
SETTINGS_ENV = "MLOPS_SETTINGS"
ENV_PREFIX = "MLOPS_"


def _on_off(value: Any) -> Any:
    """YAML 1.1 reads an unquoted ``on``/``off`` as a boolean."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class TrackingConfig(Section):
    """MLflow: where runs and the registry live, and what the tracker records besides metrics."""

    uri: NonEmpty = Field(default="sqlite:///mlflow.db", description="tracking URI: sqlite:///mlflow.db (embedded) or http://host:port")
    experiment: NonEmpty = Field(default="mlops-pipeline", description="MLflow experiment name")
    artifact_root: NonEmpty = Field(default="mlartifacts", description="artifact root for new experiments on a local store")
    flush_interval_s: Float = Field(default=1.0, gt=0, description="seconds between background metric flushes, > 0")
    spool_dir: NonEmpty = Field(default=".mlflow-spool", description="directory of the append-only spool used while the store is unreachable")
    system_metrics_interval_s: Float = Field(default=5.0, gt=0, description="seconds between system metric samples, > 0")
    histogram_every_steps: Int | None = Field(default=50, gt=0, description="steps between weight/gradient histograms, or null for none")
    confusion_every_epoch: bool = Field(default=False, description="log a validation confusion matrix after every epoch")
    progress: Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)] = Field(default="auto", description="training progress bar (auto: only on a terminal)")
    tensorboard_dir: str | None = Field(default=None, description="directory of the live TensorBoard logs (one <run id> directory each, removed once logged to the run), or null: mlops-tensorboard in the system's temporary directory")


class CheckpointConfig(Section):
    """train: tiered checkpoints (see docs in ml/checkpoint/manager.py)."""

    dir: NonEmpty = Field(default="checkpoints", description="root of the training/milestone/production tiers")
    every_steps: Int | None = Field(default=200, gt=0, description="optimizer steps between training checkpoints, or null")
    every_seconds: Float | None = Field(default=None, gt=0, description="seconds between training checkpoints, or null")
    keep_last: Int = Field(default=2, ge=2, description="training checkpoints kept, >= 2")
    monitor: tuple[Annotated[str, Field(pattern=r"^[^:]+:(min|max)$")], ...] = Field(default=("val_accuracy:max", "val_loss:min"), description="milestone metrics as metric:min or metric:max")
    compress: Literal["none", "zstd"] = Field(default="none", description="compression of the training tier")
    checksum: Literal["crc32c", "sha256", "crc32"] = Field(default="crc32c", description="per-file digest of the training tier in the manifest: crc32c (hardware CRC-32C), sha256 or crc32 (milestones and releases always sha256)")
    writer_priority: Literal["normal", "idle"] = Field(default="normal", description="scheduling priority of the training tier's checksum and write threads: idle takes only CPU time training leaves (less stall, later durable commit)")
    resume: bool = Field(default=True, description="resume from the newest valid training checkpoint of the same configuration")
    autotune_cache_dir: str | None = Field(default=None, description="directory of train.optimize auto's cached choices (autotune.json), or null: checkpoint.dir, and for a flow run in a workspace the workspaces' root, so deployment runs share one cache")
    s3_bucket: str | None = Field(default=None, description="S3 bucket mirrored after each local commit, or null")
    s3_prefix: str = Field(default="mlops-pipeline/checkpoints", description="key prefix inside the bucket")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint URL, or null for AWS")


class ServeConfig(Section):
    """mlops serve: the HTTP endpoint that serves the champion."""

    endpoint: NonEmpty = Field(default="digits", description="endpoint name (lineage and deployment records use it)")
    host: NonEmpty = Field(default="127.0.0.1", description="address to bind")
    port: Int = Field(default=8080, ge=0, le=65535, description="port to bind (0: any free port)")
    alias: NonEmpty = Field(default="champion", description="registry alias to serve and follow")
    poll_interval_s: Float = Field(default=5.0, gt=0, description="seconds between checks of the alias, > 0")
    max_body_bytes: Int = Field(default=1048576, gt=0, description="largest accepted request body; larger gets 413")
    records_dir: NonEmpty = Field(default="deployments", description="directory of deployment records")


class PromotionConfig(Section):
    """promotion flow: wait for an approval in the registry, then move the alias."""

    alias: NonEmpty = Field(default="champion", description="alias a promoted version takes")
    timeout_s: Float = Field(default=86400.0, gt=0, description="seconds to wait for an approval before giving up, > 0")
    poll_interval_s: Float = Field(default=10.0, gt=0, description="seconds between checks of the approval status, > 0")
    after_training: bool = Field(default=False, description="the training flow ends by starting the promotion flow")
    revert_unverified_alias: bool = Field(default=False, description="move the alias back to the last verified champion when it points at an unverified version")


class ServerConfig(Section):
    """mlops up: the MLflow server, from a local UI to a team's server on PostgreSQL with artifacts on S3."""

    backend_store: str | None = Field(default=None, description="database the MLflow server serves, e.g. postgresql://user:password@host:5432/mlflow (through psycopg 3), or null for tracking.uri")
    artifacts: str | None = Field(default=None, description="s3://bucket/prefix (proxied by the server: clients need no S3 credentials) or a directory, or null for tracking.artifact_root")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint of the artifacts (the server's MLFLOW_S3_ENDPOINT_URL), or null for AWS or the environment's")
    host: NonEmpty = Field(default="127.0.0.1", description="interface the MLflow server binds; any but loopback needs auth (or mlops up --insecure)")
    port: Int = Field(default=5000, ge=1, le=65535, description="MLflow server port")
    auth: bool = Field(default=False, description="MLflow's basic-auth mode (mlflow server --app-name basic-auth; accounts as MLFLOW_AUTH_CONFIG_PATH says)")
    allowed_hosts: tuple[NonEmpty, ...] = Field(default=(), description="Host headers the server accepts besides MLflow's default (localhost, private IPs): its DNS names")


class DataRemoteConfig(Section):
    """The DVC remote the training flow pushes its outputs to and a fresh clone pulls them from (ml/data/remote.py)."""

    url: Annotated[str, Field(pattern=r"^(s3://[^/\s]+(/\S*)?|[^:\s][^:]*)$")] | None = Field(default=None, description="DVC remote storage: s3://bucket/prefix or a directory (relative to the working directory), or null for none: data stays in the local DVC cache")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")] = Field(default="storage", description="name of the DVC remote, set as the default remote in .dvc/config.local (never the committed .dvc/config)")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint of the remote (DVC's endpointurl), or null for AWS")


class WorkspaceConfig(Section):
    """Where a training or tuning flow run works (flows/workspace.py): the checkout, or a git worktree of its own."""

    mode: Literal["auto", "checkout", "worktree"] = Field(default="auto", description="auto: flow runs of a deployment (a Prefect worker's) each in a worktree, runs by hand (python -m flows.*, make run) in the checkout; checkout or worktree: always that")
    root: str | None = Field(default=None, description="directory the worktrees are made in (relative: to the checkout), or null for $XDG_CACHE_HOME/mlops-pipeline/workspaces (~/.cache when unset)")


class Settings(BaseSettings):
    """All runtime settings (see the module docstring for where each value comes from)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False,
                                      frozen=True, extra="forbid")

    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="training checkpoints")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="the serving endpoint")
    promotion: PromotionConfig = Field(default_factory=PromotionConfig, description="the promotion flow")
    server: ServerConfig = Field(default_factory=ServerConfig, description="the MLflow server of mlops up")
    data_remote: DataRemoteConfig = Field(default_factory=DataRemoteConfig, description="the DVC remote of the training flow's outputs")
    workspace: WorkspaceConfig = Field(default_factory=WorkspaceConfig, description="where each flow run works")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init values, so environment variables override it.
        return env_settings, init_settings


def settings_path(path: str | Path | None = None) -> tuple[Path, bool]:
    """The settings file to read and whether it was asked for explicitly (then it must exist)."""
    if path is not None:
        return Path(path), True
    if os.environ.get(SETTINGS_ENV):
        return Path(os.environ[SETTINGS_ENV]), True
    return DEFAULT_SETTINGS, False


def _env_name(loc: tuple[Any, ...]) -> str:
    return ENV_PREFIX + "__".join(str(p) for p in loc[:2]).upper()


def autotune_cache_dir(checkpoint: CheckpointConfig) -> str:
    """Where ``train.optimize: auto`` caches its choices: ``checkpoint.autotune_cache_dir``, else
    ``checkpoint.dir``."""
    return checkpoint.autotune_cache_dir or checkpoint.dir


def load_settings(path: str | Path | None = None) -> Settings:
    """Reads the settings file (see :func:`settings_path`) under ``MLOPS_*`` environment variables."""
    file, explicit = settings_path(path)
    if explicit or file.is_file():
        raw = read_yaml(file, "settings file")
    else:
        raw = {}
    bad = [k for k in raw if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{bad[0]}: unknown settings section; expected one of {', '.join(Settings.model_fields)} (from {file})")
    try:
        return Settings(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        env = _env_name(tuple(err["loc"]))
        from_env = any(k.upper() == env for k in os.environ)
        line = config_error(exc, model=Settings, raw={} if from_env else raw, sections="settings section")
        raise ConfigError(f"{line} (from {env if from_env else file})") from None
