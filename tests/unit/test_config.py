import pytest
import yaml
from pydantic import ValidationError

from ml.config import Params, load_params
from ml.errors import ConfigError
from ml.settings import Settings, load_settings
from tests.conftest import REPO, base_params, write_params, write_settings


def test_repository_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.train.hidden_sizes == (128, 64)
    assert params.data.source == "sklearn:digits"


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "lr", -0.001, "train.lr: expected AdamW learning rate, > 0, got -0.001"),
    ("train", "lr", "fast", "train.lr: expected float, got 'fast'"),
    ("train", "epochs", 0, "train.epochs: expected passes over the training split, got 0"),
    ("train", "epochs", 2.5, "train.epochs: expected int, got 2.5"),
    ("train", "device", "tpu", "train.device: expected one of auto, cpu, cuda, got 'tpu'"),
    ("train", "hidden_sizes", [64, -1], "train.hidden_sizes: expected widths"),
    ("train", "dropout", 1.0, "train.dropout: expected dropout probability"),
    ("data", "test_size", 1.5, "data.test_size: expected fraction of rows held out for test"),
    ("data", "val_size", 0.85, "data.test_size + data.val_size: expected a sum below 1"),
    ("drift", "psi_warn", 0.5, "drift.psi_warn: expected a value <= drift.psi_fail"),
    ("register", "min_test_accuracy", 2, "register.min_test_accuracy: expected"),
    ("train", "seed", True, "train.seed: expected int, got True"),
    ("train", "lr", True, "train.lr: expected float, got True"),
    ("train", "lr", None, "train.lr: expected float, got null"),
    ("train", "hidden_sizes", [64, "wide"], "train.hidden_sizes[1]: expected int, got 'wide'"),
    ("train", "hidden_sizes", [], "train.hidden_sizes: expected widths of the MLP's hidden layers, e.g. [128, 64], got []"),
    ("train", "early_stopping_patience", 0, "train.early_stopping_patience: expected epochs in a row without"),
    ("train", "early_stopping_metric", "val_f1", "train.early_stopping_metric: expected one of val_loss, val_accuracy, "
                                                 "train_loss, train_accuracy, got 'val_f1'"),
    ("validate", "min_class_fraction", 0.5, "validate.min_class_fraction: expected a value <= validate.max_class_fraction, got 0.5 > 0.2"),
    ("data", "source", " ", "data.source: expected `sklearn:digits`, or a path to a .csv/.parquet file, got ' '"),
])
def test_bad_values_name_the_key(tmp_path, section, key, value, message):
    params = base_params()
    params[section][key] = value
    with pytest.raises(ConfigError) as err:
        load_params(write_params(tmp_path, params))
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_unknown_key_is_named(tmp_path):
    params = base_params()
    params["train"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"^train.learning_rate: unknown key; expected one of hidden_sizes"):
        load_params(write_params(tmp_path, params))


def test_missing_key_is_named(tmp_path):
    params = base_params()
    del params["train"]["batch_size"]
    with pytest.raises(ConfigError, match=r"^train.batch_size: missing key"):
        load_params(write_params(tmp_path, params))


def test_unknown_and_missing_sections(tmp_path):
    params = base_params()
    params["tuning"] = {}
    with pytest.raises(ConfigError, match=r"^tuning: unknown section"):
        load_params(write_params(tmp_path, params))
    del params["tuning"], params["evaluate"]
    with pytest.raises(ConfigError, match=r"^evaluate: missing section"):
        load_params(write_params(tmp_path, params))
    params = base_params()
    params["train"] = [1, 2]
    with pytest.raises(ConfigError, match=r"^train: expected a mapping, got \[1, 2\]"):
        load_params(write_params(tmp_path, params))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_params_are_frozen(tmp_path):
    params = load_params(write_params(tmp_path, base_params()))
    with pytest.raises(ValidationError, match="frozen"):
        params.train.lr = 1.0  # type: ignore[misc]


def test_nullable_fields_accept_null(tmp_path):
    params = base_params()
    params["train"]["early_stopping_patience"] = None
    params["anomaly"]["max_grad_norm"] = None
    loaded = load_params(write_params(tmp_path, params))
    assert loaded.train.early_stopping_patience is None and loaded.anomaly.max_grad_norm is None


def test_exponent_notation_is_a_number(tmp_path):
    """YAML 1.1 reads 1e-6 (no dot) as a string; a float key reads it as the number."""
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(base_params(), sort_keys=False).replace("weight_decay: 0.0001", "weight_decay: 1e-4", 1))
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]["weight_decay"] == "1e-4"
    params = load_params(tmp_path / "params.yaml")
    assert params.train.weight_decay == pytest.approx(1e-4) and isinstance(params.train.weight_decay, float)
    (decay,) = [p for p in load_params(REPO / "params.yaml").tune.search_space if p.name == "weight_decay"]
    assert decay.low == pytest.approx(1e-6) and decay.high == pytest.approx(1e-3)


def test_params_hold_no_runtime_settings():
    assert set(Params.model_fields) & set(Settings.model_fields) == set()
    assert set(base_params()) == set(Params.model_fields)


def test_every_field_is_described():
    from ml.config import DataConfig, TuneConfig
    from ml.settings import PromotionConfig

    for model in (*[f.annotation for f in Params.model_fields.values()],
                  *[f.annotation for f in Settings.model_fields.values()]):
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name}"
    assert DataConfig.model_config["frozen"] and TuneConfig.model_config["extra"] == "forbid"
    assert PromotionConfig().revert_unverified_alias is False


# -- runtime settings ---------------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No MLOPS_* variables from outside, and an empty working directory."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("MLOPS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_repository_settings_file_lists_every_key_at_its_default(clean_env):
    raw = yaml.safe_load((REPO / "settings.yaml").read_text())
    defaults = Settings().model_dump()
    assert {s: set(v) for s, v in raw.items()} == {s: set(v) for s, v in defaults.items()}
    assert load_settings(REPO / "settings.yaml") == Settings()


def test_settings_default_without_a_file(clean_env):
    settings = load_settings()
    assert settings.tracking.uri == "sqlite:///mlflow.db" and settings.checkpoint.keep_last == 2
    assert settings.promotion.revert_unverified_alias is False


def test_environment_overrides_the_file_which_overrides_defaults(clean_env, tmp_path):
    write_settings(tmp_path, tracking={"progress": "off", "flush_interval_s": 2}, serve={"port": 9000})
    clean_env.setenv("MLOPS_TRACKING__PROGRESS", "on")
    clean_env.setenv("MLOPS_CHECKPOINT__MONITOR", '["val_loss:min"]')
    clean_env.setenv("MLOPS_PROMOTION__AFTER_TRAINING", "true")
    settings = load_settings()
    assert settings.tracking.progress == "on"  # env over file
    assert settings.tracking.flush_interval_s == 2.0 and settings.serve.port == 9000  # file over default
    assert settings.checkpoint.monitor == ("val_loss:min",) and settings.promotion.after_training is True
    assert settings.tracking.uri == "sqlite:///mlflow.db"  # default


def test_unquoted_on_off_reads_as_the_progress_choice(clean_env, tmp_path):
    (tmp_path / "settings.yaml").write_text("tracking:\n  progress: off\n")
    assert load_settings().tracking.progress == "off"


def test_settings_file_from_environment_or_argument(clean_env, tmp_path):
    other = tmp_path / "elsewhere.yaml"
    other.write_text(yaml.safe_dump({"serve": {"records_dir": "recs"}}))
    clean_env.setenv("MLOPS_SETTINGS", str(other))
    assert load_settings().serve.records_dir == "recs"
    clean_env.setenv("MLOPS_SETTINGS", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"missing.yaml: settings file not found$"):
        load_settings()
    with pytest.raises(ConfigError, match=r"nope.yaml: settings file not found$"):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize("sections, env, message", [
    ({"tracking": {"flush_interval_s": 0}}, {},
     "tracking.flush_interval_s: expected seconds between background metric flushes, > 0, got 0 (from settings.yaml)"),
    ({}, {"MLOPS_TRACKING__FLUSH_INTERVAL_S": "-1"},
     "tracking.flush_interval_s: expected seconds between background metric flushes, > 0, got '-1' "
     "(from MLOPS_TRACKING__FLUSH_INTERVAL_S)"),
    ({"tracking": {"progress": "sometimes"}}, {},
     "tracking.progress: expected one of auto, on, off, got 'sometimes' (from settings.yaml)"),
    ({"tracking": {"uri_typo": "x"}}, {}, "tracking.uri_typo: unknown key; expected one of uri, experiment"),
    ({"tracing": {}}, {}, "tracing: unknown settings section; expected one of tracking, checkpoint, serve, promotion"),
    ({"checkpoint": {"keep_last": 1}}, {}, "checkpoint.keep_last: expected training checkpoints kept, >= 2, got 1"),
    ({"checkpoint": {"monitor": ["val_loss"]}}, {},
     "checkpoint.monitor: expected milestone metrics as metric:min or metric:max, got ['val_loss']"),
    ({"serve": {"port": "http"}}, {}, "serve.port: expected int, got 'http'"),
    ({"promotion": {"after_training": "maybe"}}, {}, "promotion.after_training: expected bool, got 'maybe'"),
    ({"serve": 8080}, {}, "serve: expected a mapping, got 8080"),
])
def test_bad_settings_are_one_line_naming_key_value_and_source(clean_env, tmp_path, sections, env, message):
    write_settings(tmp_path, **sections)
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_settings_yaml_that_is_not_a_mapping(clean_env, tmp_path):
    (tmp_path / "settings.yaml").write_text("- tracking\n")
    with pytest.raises(ConfigError, match=r"settings.yaml: expected a mapping of sections$"):
        load_settings()
    (tmp_path / "settings.yaml").write_text("tracking: [unclosed")
    with pytest.raises(ConfigError, match=r"settings.yaml: not valid YAML"):
        load_settings()


def test_readme_documents_every_setting_with_its_default():
    import json

    readme = (REPO / "README.md").read_text()
    for section, info in Settings.model_fields.items():
        for key, field in info.annotation.model_fields.items():
            default = list(field.default) if isinstance(field.default, tuple) else field.default
            shown = ("null" if default is None else str(default).lower() if isinstance(default, bool)
                     else json.dumps(default) if isinstance(default, list) else str(default))
            assert f"| `{section}.{key}` | `{shown}` |" in readme, f"{section}.{key} (default {shown})"
