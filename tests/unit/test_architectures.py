"""The built-in architectures and a user's factory: one flat signature for all, the spec and weights
round-trip through save/load, activation checkpointing and channels_last keep the math and the
state-dict keys, and bad model params are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ml.config import TrainConfig, load_params
from ml.errors import ConfigError
from ml.model.architectures import (ModelSpec, build_model, enable_activation_checkpointing, image_shape,
                                    set_channels_last)
from ml.model.predict import inference_model, predict
from ml.model.serialization import load_model, save_model
from ml.train.speed import SpeedSettings, resolve_speed

from tests.conftest import REPO


def tiny_factory(input_shape, num_classes, width=16):
    """A user's network: flattens its image and marks one block for activation checkpointing."""
    block = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), width), nn.GELU())
    block.activation_checkpoint_block = True
    return nn.Sequential(block, nn.Linear(width, num_classes))


def not_a_module(input_shape, num_classes):
    return "a string"


SPECS = {
    "mlp": ModelSpec(64, (32,), 10, 0.1),
    "cnn": ModelSpec(64, (32,), 10, 0.1, "cnn", (1, 8, 8), {"channels": [8, 16]}),
    "vit": ModelSpec(64, (32,), 10, 0.1, "vit", (1, 8, 8), {"dim": 16, "depth": 2, "heads": 2}),
    "factory": ModelSpec(64, (32,), 10, 0.1, "factory", (1, 8, 8), {"width": 12},
                         "tests.unit.test_architectures:tiny_factory"),
}


def rows(n=20, seed=0):
    return np.random.default_rng(seed).uniform(0, 16, size=(n, 64)).astype(np.float32)


def built(name, seed=0):
    torch.manual_seed(seed)
    model = build_model(SPECS[name])
    model.set_input_stats(rows(100, seed=1))
    return model


@pytest.mark.parametrize("name", list(SPECS))
def test_every_architecture_takes_flat_rows_and_round_trips_through_save_and_load(name, tmp_path):
    model = built(name).eval()
    x = rows()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    assert logits.shape == (20, 10)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.spec == model.spec
    assert inference_model(again, 64) is again
    np.testing.assert_array_equal(predict(again, x).classes, logits.argmax(dim=1).numpy())


@pytest.mark.parametrize("name", ["cnn", "vit", "factory"])
def test_activation_checkpointing_keeps_keys_loss_and_gradients(name):
    plain, wrapped = built(name), built(name)
    assert enable_activation_checkpointing(wrapped) >= 1
    assert list(plain.state_dict()) == list(wrapped.state_dict())
    x, y = torch.from_numpy(rows(32)), torch.arange(32) % 10
    grads = []
    for model in (plain, wrapped):
        model.train()
        torch.manual_seed(5)  # the same dropout masks
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_channels_last_keeps_the_outputs_and_the_saved_weights(tmp_path):
    plain, nhwc = built("cnn").eval(), built("cnn").eval()
    set_channels_last(nhwc)
    conv = nhwc.body.blocks[1].conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.from_numpy(rows())
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x), plain(x), rtol=1e-5, atol=1e-5)
    save_model(nhwc, tmp_path / "m")
    reloaded = load_model(tmp_path / "m")
    assert all(torch.equal(reloaded.state_dict()[k], plain.state_dict()[k]) for k in plain.state_dict())


@pytest.mark.parametrize("spec, fragment", [
    (ModelSpec(64, (8,), 10, 0.0, "factory", (1, 8, 8), {}, "no_such_package.mod:fn"),
     "train.model_factory: cannot import 'no_such_package.mod:fn'"),
    (ModelSpec(64, (8,), 10, 0.0, "factory", (1, 8, 8), {}, "tests.unit.test_architectures:missing"),
     "train.model_factory: cannot import 'tests.unit.test_architectures:missing'"),
    (ModelSpec(64, (8,), 10, 0.0, "factory", (1, 8, 8), {}, "tests.unit.test_architectures:not_a_module"),
     "train.model_factory: expected 'tests.unit.test_architectures:not_a_module' to return an nn.Module, got str"),
    (ModelSpec(64, (8,), 10, 0.0, "cnn", (1, 8, 8), {"chanels": [8]}),
     "train.model_kwargs.chanels: unknown for model cnn; expected one of channels, groups"),
    (ModelSpec(64, (8,), 10, 0.0, "vit", (1, 8, 8), {"patch_size": 3}),
     "train.model_kwargs.patch_size: expected a divisor of the image's height and width [8, 8], got 3"),
    (ModelSpec(64, (8,), 10, 0.0, "mlp", (), {"depth": 2}), "train.model_kwargs.depth: unknown for model mlp"),
    (ModelSpec(64, (8,), 10, 0.0, "resnet"), "train.model: expected one of mlp, cnn, vit"),
])
def test_bad_model_params_are_one_line(spec, fragment):
    with pytest.raises(ConfigError) as err:
        build_model(spec)
    assert str(err.value).startswith(fragment) and "\n" not in str(err.value)


def test_image_shapes_are_checked_against_the_features():
    assert image_shape(64, None) == (1, 8, 8)
    assert image_shape(64, (4, 4, 4)) == (4, 4, 4)
    with pytest.raises(ConfigError, match=r"^train.input_shape: expected a shape of 64 values .*got \[1, 8, 9\]$"):
        image_shape(64, (1, 8, 9))
    with pytest.raises(ConfigError, match=r"^train.input_shape: expected a shape such as \[channels, height, width\]"):
        image_shape(10, None)


def train_cfg(**keys):
    return TrainConfig.model_validate({**load_params(REPO / "params.yaml").train.model_dump(), **keys})


CPU = torch.device("cpu")


@pytest.mark.parametrize("keys, expected", [
    ({}, SpeedSettings()),
    ({"optimize": "basic"}, SpeedSettings(fused_optimizer=True)),
    ({"optimize": "advanced", "model": "cnn"},
     SpeedSettings("bf16", "default", "channels_last", False, True)),
    ({"optimize": "advanced"}, SpeedSettings("bf16", "default", "contiguous", False, True)),
    ({"optimize": "max", "model": "vit"}, SpeedSettings("bf16", "max-autotune", "contiguous", True, True)),
    ({"optimize": "max", "model": "cnn", "precision": "fp32", "compile": "off", "activation_checkpointing": False},
     SpeedSettings("fp32", "off", "channels_last", False, True)),
    ({"precision": "bf16"}, SpeedSettings(precision="bf16")),
])
def test_presets_resolve_and_explicit_keys_override_them(keys, expected):
    if keys.get("optimize") in ("advanced", "max") and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        expected = SpeedSettings(**{**expected.__dict__, "precision": keys.get("precision", "fp32")})
    assert resolve_speed(train_cfg(**keys), CPU) == expected


@pytest.mark.parametrize("keys, fragment", [
    ({"optimize": "fastest"}, "train.optimize: expected one of off, basic, advanced, max, auto, got 'fastest'"),
    ({"memory_format": "channels_last"}, "train.memory_format: expected contiguous for the mlp"),
    ({"model": "factory"}, "train.model_factory: expected 'package.module:function' exactly when train.model is factory"),
    ({"compile": "fastest"}, "train.compile: expected one of off, default, reduce-overhead, max-autotune, got 'fastest'"),
])
def test_bad_speed_and_model_keys_are_one_line(keys, fragment):
    from ml.config import build_section

    raw = {**load_params(REPO / "params.yaml").train.model_dump(), **keys}
    with pytest.raises(ConfigError) as err:
        build_section(TrainConfig, "train", raw)
    assert str(err.value).startswith(fragment) and "\n" not in str(err.value)


def test_yaml_off_is_the_off_choice():
    assert train_cfg(optimize=False, compile=False).compile == "off"


def test_fp16_on_the_cpu_is_one_line():
    with pytest.raises(ConfigError, match=r"^train.precision: expected fp32 or bf16 on the CPU \(fp16 needs CUDA"):
        resolve_speed(train_cfg(precision="fp16"), CPU)
