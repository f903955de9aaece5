"""Mixed precision and compile in the loop: a run interrupted mid-epoch and resumed ends
bit-identical to a straight run under bf16 autocast and under torch.compile; a compiler that fails
leaves training eager with the reason; fp16 with a GradScaler on CUDA."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ml.model.architectures import ModelSpec, build_model
from ml.train.compile import compile_forward, example_batches
from ml.train.loop import Callback, fit, seed_everything
from ml.train.speed import autocast_for, grad_scaler_for

CPU = torch.device("cpu")
SPEC = ModelSpec(64, (16,), 4, 0.1, "cnn", (1, 8, 8), {"channels": [8, 16]})


def data(n=192, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 16, size=(n, 64)).astype(np.float32)
    y = (x[:, :16].mean(axis=1) > 8).astype(np.int64) + 2 * (x[:, 48:].mean(axis=1) > 8).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def fresh_model():
    seed_everything(3)
    model = build_model(SPEC)
    model.set_input_stats(data()[0].numpy())
    return model


class StopAt(Callback):
    def __init__(self, step=None):
        self.step, self.losses = step, []

    def on_log(self, state, values):
        self.losses += [v.loss for v in values]
        if state.global_step == self.step:
            state.stop = True


def straight_and_resumed(model, forward, autocast, stop_at=9):
    """Trains ``model`` (through ``forward``) straight for 3 epochs, then again from the same start
    stopped at ``stop_at`` and resumed from copies of its states; returns both runs' losses and
    weights."""
    train, val = data(), data(seed=1)
    start = copy.deepcopy(model.state_dict())
    runs = []
    for stop in (None, stop_at):
        model.load_state_dict(start)
        generator = seed_everything(3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        hook = StopAt(stop)
        kwargs = dict(epochs=3, batch_size=32, autocast=autocast, eval_model=model)
        state = fit(forward, optimizer, train, val, generator=generator, hooks=[hook], **kwargs)
        losses = list(hook.losses)
        if stop is not None:
            saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), copy.deepcopy(state),
                     generator.get_state(), torch.get_rng_state())
            torch.manual_seed(12345)  # a resumed process starts from other RNG states
            model.load_state_dict(start)
            model.load_state_dict(saved[0])
            optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
            optimizer.load_state_dict(saved[1])
            generator = torch.Generator()
            generator.set_state(saved[3])
            torch.set_rng_state(saved[4])
            saved[2].stop = False
            rest = StopAt()
            fit(forward, optimizer, train, val, generator=generator, hooks=[rest], state=saved[2], **kwargs)
            losses += rest.losses
        runs.append((losses, copy.deepcopy(model.state_dict()), state))
    return runs


def assert_identical(runs):
    (losses_a, weights_a, _), (losses_b, weights_b, _) = runs
    assert losses_a == losses_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_bf16_autocast_resumes_bit_identical_and_trains_in_bf16():
    model = fresh_model()
    autocast = autocast_for("bf16", CPU)
    with autocast():
        assert model(data()[0][:4]).dtype == torch.bfloat16
    runs = straight_and_resumed(model, model, autocast)
    assert_identical(runs)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    plain = fresh_model()
    fp32 = straight_and_resumed(plain, plain, autocast_for("fp32", CPU), stop_at=None)
    assert runs[0][0] != fp32[0][0]  # autocast changed the numerics: bf16 really ran


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One compiled cnn for the module's compile tests, with its own inductor cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    model = fresh_model()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    result = compile_forward(model, "default", example_batches(*data(), 32), autocast_for("bf16", CPU))
    assert torch.equal(torch.get_rng_state(), rng)  # compiling drew no random numbers
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    yield model, result
    mp.undo()


@pytest.mark.slow
def test_a_compiled_bf16_run_resumes_bit_identical_and_saves_plain_keys(compiled):
    model, result = compiled
    assert result.compiled and result.fallback_reason is None and result.seconds > 0
    assert not any(k.startswith("_orig_mod.") for k in model.state_dict())
    assert any(k.startswith("_orig_mod.") for k in result.forward.state_dict())  # what a plain save would avoid
    assert_identical(straight_and_resumed(model, result.forward, autocast_for("bf16", CPU)))


@pytest.mark.slow
def test_a_compiler_that_fails_leaves_the_model_eager_with_the_reason(monkeypatch, tmp_path):
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    torch._dynamo.reset()
    model = build_model(ModelSpec(64, (16,), 3, 0.0, "cnn", (1, 8, 8), {"channels": [4]}))
    result = compile_forward(model, "max-autotune", example_batches(*data(48), 16), autocast_for("fp32", CPU))
    torch._dynamo.reset()
    assert not result.compiled and result.forward is model
    assert result.fallback_reason and "\n" not in result.fallback_reason
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.cuda
def test_fp16_with_a_grad_scaler_trains_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cuda = torch.device("cuda")
    model = fresh_model().to(cuda)
    scaler = grad_scaler_for("fp16", cuda)
    train, val = (t.to(cuda) for t in data()), (t.to(cuda) for t in data(seed=1))
    state = fit(model, torch.optim.AdamW(model.parameters(), lr=0.01), tuple(train), tuple(val), epochs=3,
                batch_size=32, generator=seed_everything(3), autocast=autocast_for("fp16", cuda), scaler=scaler)
    assert scaler.get_scale() > 0 and all(p.dtype == torch.float32 for p in model.parameters())
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
