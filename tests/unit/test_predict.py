"""The one predict: our network, and the same network as MLflow's pt2 format loads it (a
``torch.export`` program that refuses ``eval()``)."""

import numpy as np
import pytest
import torch

from ml.model.architectures import MLP, ModelSpec
from ml.model.predict import inference_model, predict


def trained(dropout=0.5):
    torch.manual_seed(0)
    model = MLP(ModelSpec(6, (16, 8), 4, dropout))
    model.set_input_stats(np.random.default_rng(0).normal(2.0, 3.0, size=(50, 6)).astype(np.float32))
    return model


def rows(n=37):
    return np.random.default_rng(1).normal(2.0, 3.0, size=(n, 6)).astype(np.float32)


def exported(model):
    model.eval()
    program = torch.export.export(model, (torch.zeros(2, 6),),
                                  dynamic_shapes=({0: torch.export.Dim("rows", min=1, max=4096)},))
    return program.module()


def test_an_mlp_in_training_mode_predicts_without_dropout():
    model = trained()
    model.train()
    x = rows()
    first = predict(inference_model(model), x, batch_size=5)
    assert not model.training
    second = predict(model, x, batch_size=64)
    assert np.array_equal(first.classes, second.classes) and first.probabilities is None
    with torch.no_grad():
        assert np.array_equal(first.classes, model(torch.from_numpy(x)).argmax(dim=1).numpy())


def test_probabilities_are_softmax_rows_matching_the_classes():
    x = rows()
    out = predict(inference_model(trained()), x, batch_size=10, probabilities=True)
    assert out.probabilities.shape == (37, 4) and out.probabilities.dtype == np.float32
    assert np.allclose(out.probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert np.array_equal(out.probabilities.argmax(axis=1), out.classes)
    empty = predict(trained(), x[:0], probabilities=True)
    assert empty.classes.shape == (0,) and empty.classes.dtype == np.int64


def test_an_exported_program_is_served_as_the_eager_network_it_describes():
    model = trained()
    program = exported(model)
    with pytest.raises(NotImplementedError):
        program.eval()
    x = rows()
    as_program = inference_model(program)                  # no width: the program itself, eval() skipped
    as_eager = inference_model(program, width=6)
    assert as_program is program and isinstance(as_eager, MLP)
    expected = predict(model, x, probabilities=True)
    for candidate in (as_program, as_eager):
        got = predict(candidate, x, probabilities=True)
        assert np.array_equal(got.classes, expected.classes)
        assert np.allclose(got.probabilities, expected.probabilities, atol=1e-6)


def test_weights_that_do_not_describe_our_network_keep_the_loaded_model():
    other = torch.nn.Sequential(torch.nn.Linear(6, 4))
    assert inference_model(other, width=6) is other
    assert predict(other, rows()).classes.shape == (37,)
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1, got 0"):
        predict(other, rows(), batch_size=0)
