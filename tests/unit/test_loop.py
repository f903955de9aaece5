import copy

import numpy as np
import pytest
import torch

from ml.train.loop import LoopState, batches_per_epoch, fit, seed_everything
from ml.model.architectures import MLP, ModelSpec, load_model, predict, save_model


def data(n=200, features=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y % classes)


def setup(seed=3):
    generator = seed_everything(seed)
    model = MLP(ModelSpec(8, (16,), 3, 0.2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    return model, optimizer, generator


class StepRecorder:
    def __init__(self, stop_at=None):
        self.losses, self.stop_at = [], stop_at

    def on_step_end(self, state, loss):
        self.losses.append(loss)
        if state.global_step == self.stop_at:
            state.stop = True

    def on_epoch_end(self, state, metrics):
        pass


@pytest.mark.parametrize("n, batch, expected", [(200, 64, 4), (192, 64, 3), (1, 64, 1), (64, 1, 64)])
def test_batches_per_epoch(n, batch, expected):
    assert batches_per_epoch(n, batch) == expected


def test_same_seed_same_weights():
    train, val = data(), data(seed=1)
    results = []
    for _ in range(2):
        model, optimizer, generator = setup()
        fit(model, optimizer, train, val, epochs=2, batch_size=32, generator=generator)
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_loop_learns_and_records_history():
    model, optimizer, generator = setup()
    state = fit(model, optimizer, data(), data(seed=1), epochs=5, batch_size=32, generator=generator)
    assert [h["epoch"] for h in state.history] == [1, 2, 3, 4, 5]
    assert state.global_step == 5 * batches_per_epoch(200, 32)
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
    assert state.history[-1]["val_accuracy"] > 0.7


@pytest.mark.parametrize("stop_at", [7, 14])  # mid-epoch (7 batches per epoch: 200/32) and a boundary
def test_resume_from_loop_state_equals_uninterrupted(stop_at):
    train, val = data(), data(seed=1)
    model, optimizer, generator = setup()
    straight = StepRecorder()
    fit(model, optimizer, train, val, epochs=3, batch_size=32, generator=generator, hooks=[straight])

    model2, optimizer2, generator2 = setup()
    first = StepRecorder(stop_at=stop_at)
    state = fit(model2, optimizer2, train, val, epochs=3, batch_size=32, generator=generator2, hooks=[first])
    assert state.global_step == stop_at
    snapshot = (copy.deepcopy(model2.state_dict()), copy.deepcopy(optimizer2.state_dict()),
                copy.deepcopy(state), generator2.get_state(), torch.get_rng_state())

    torch.manual_seed(12345)  # a resumed process starts from other RNG states
    model3, optimizer3, _ = setup(seed=99)
    model3.load_state_dict(snapshot[0])
    optimizer3.load_state_dict(snapshot[1])
    generator3 = torch.Generator()
    generator3.set_state(snapshot[3])
    torch.set_rng_state(snapshot[4])
    resumed_state: LoopState = snapshot[2]
    resumed_state.stop = False
    rest = StepRecorder()
    fit(model3, optimizer3, train, val, epochs=3, batch_size=32, generator=generator3, hooks=[rest],
        state=resumed_state)
    assert first.losses + rest.losses == straight.losses
    assert all(torch.equal(model.state_dict()[k], model3.state_dict()[k]) for k in model.state_dict())


def test_model_round_trip_through_safetensors(tmp_path):
    model, _, _ = setup()
    model.set_input_stats(data()[0].numpy())
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    x = data(seed=5)[0].numpy()
    assert np.array_equal(predict(model, x), predict(loaded, x))
    assert torch.equal(model.mean, loaded.mean)
