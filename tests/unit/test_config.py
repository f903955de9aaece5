import pytest

from ml.config import load_params
from ml.errors import ConfigError
from tests.conftest import base_params, write_params


def test_repository_params_load():
    from tests.conftest import REPO

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
    ("validate", "feature_min", 20.0, "validate.feature_min: expected a value <= validate.feature_max"),
    ("register", "min_test_accuracy", 2, "register.min_test_accuracy: expected"),
    ("train", "seed", True, "train.seed: expected int, got True"),
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


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_params_are_frozen(tmp_path):
    params = load_params(write_params(tmp_path, base_params()))
    with pytest.raises(AttributeError):
        params.train.lr = 1.0  # type: ignore[misc]


def test_nullable_fields_accept_null(tmp_path):
    params = base_params()
    params["validate"]["num_features"] = None
    params["validate"]["feature_max"] = None
    loaded = load_params(write_params(tmp_path, params))
    assert loaded.validate.num_features is None and loaded.validate.feature_max is None
