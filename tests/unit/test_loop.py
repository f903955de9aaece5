import copy

import numpy as np
import pytest
import torch

from ml.tracking.base import NullTracker
from ml.train.loop import Callback, LoopState, batches_per_epoch, fit, seed_everything
from ml.train.step import train_step
from ml.model.architectures import MLP, ModelSpec
from ml.model.predict import inference_model, predict
from ml.model.serialization import load_model, save_model


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


class StepRecorder(Callback):
    def __init__(self, stop_at=None):
        self.losses, self.stop_at = [], stop_at

    def on_log(self, state, values):
        self.losses += [v.loss for v in values]
        if state.global_step == self.stop_at:
            state.stop = True


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
    straight_state = fit(model, optimizer, train, val, epochs=3, batch_size=32, generator=generator, hooks=[straight])

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
    # the running train means of an epoch cut in two carry over in the loop state
    assert resumed_state.history == straight_state.history


class MetricLog(NullTracker):
    def __init__(self):
        self.points = []

    def log_metric(self, key, value, step):
        self.points.append((key, step, value))


class Counter(Callback):
    def __init__(self):
        self.calls, self.values = [], []

    def on_train_start(self, state):
        self.calls.append("start")

    def on_log(self, state, values):
        self.calls.append(f"log{len(values)}")
        self.values += values

    def on_epoch_end(self, state, metrics):
        self.calls.append("epoch")

    def on_train_end(self, state):
        self.calls.append("end")


def test_losses_reach_the_tracker_and_hooks_at_the_logging_interval():
    train, val = data(), data(seed=1)   # 7 batches of 32 per epoch
    runs = {}
    for every in (1, 3):
        model, optimizer, generator = setup()
        tracker, counter = MetricLog(), Counter()
        fit(model, optimizer, train, val, epochs=2, batch_size=32, generator=generator, tracker=tracker,
            hooks=[counter], log_every_steps=every)
        runs[every] = (tracker, counter, model.state_dict())
    one, three = runs[1][1], runs[3][1]
    assert three.calls == ["start", "log3", "log3", "log1", "epoch", "log3", "log3", "log1", "epoch", "end"]
    assert one.calls.count("log1") == 14
    assert three.values == one.values and [v.step for v in one.values] == list(range(1, 15))
    assert [v.epoch for v in one.values] == [1] * 7 + [2] * 7
    for tracker, _, _ in runs.values():
        for key in ("train/loss", "train/grad_norm"):
            assert [step for k, step, _ in tracker.points if k == key] == list(range(1, 15))
    assert all(torch.equal(runs[1][2][k], runs[3][2][k]) for k in runs[1][2])


def test_epoch_train_metrics_are_running_means_of_the_steps_without_a_second_pass():
    train, val = data(), data(seed=1)
    model, optimizer, generator = setup()
    forwards = []
    model.register_forward_hook(lambda module, args, out: forwards.append(len(args[0])))
    counter = Counter()
    state = fit(model, optimizer, train, val, epochs=2, batch_size=32, generator=generator, hooks=[counter])
    sizes = [32] * 6 + [8]
    assert forwards == (sizes + [len(val[0])]) * 2   # the steps and one validation pass per epoch
    for epoch, row in enumerate(state.history):
        steps = counter.values[7 * epoch:7 * (epoch + 1)]
        expected = sum(v.loss * n for v, n in zip(steps, sizes)) / 200
        assert row["train_loss"] == pytest.approx(expected, rel=1e-6)
        assert 0.0 <= row["train_accuracy"] <= 1.0 and (row["train_accuracy"] * 200) % 1 == pytest.approx(0.0)


def test_a_step_over_micro_batches_equals_one_over_their_concatenation():
    x, y = data(n=48)
    results = []
    for parts in ([(x, y)], [(x[:32], y[:32]), (x[32:], y[32:])]):
        torch.manual_seed(0)
        model = MLP(ModelSpec(8, (16,), 3, 0.0))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        out = train_step(model, optimizer, parts)
        grads = [p.grad.clone() for p in model.parameters()]
        expected_norm = torch.nn.utils.get_total_norm(grads)
        results.append((out, grads, expected_norm, model.state_dict()))
    (whole, g1, n1, w1), (split, g2, n2, w2) = results
    assert whole.samples == split.samples == 48 and int(whole.correct) == int(split.correct)
    assert torch.allclose(whole.loss, split.loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
    assert torch.equal(whole.grad_norm, n1) and torch.allclose(split.grad_norm, n2)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)
    with pytest.raises(ValueError, match="micro_batches"):
        train_step(model, optimizer, [])


def test_model_round_trip_through_safetensors(tmp_path):
    model, _, _ = setup()
    model.set_input_stats(data()[0].numpy())
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    x = data(seed=5)[0].numpy()
    assert np.array_equal(predict(inference_model(model), x).classes, predict(loaded, x).classes)
    assert torch.equal(model.mean, loaded.mean)


class Interrupted(Exception):
    pass


class SnapshotAndCrash(Callback):
    """Takes what a checkpoint would at ``step`` (between logging intervals), then ends the process."""

    def __init__(self, step, model, optimizer, generator):
        self.step, self.model, self.optimizer, self.generator = step, model, optimizer, generator

    def on_step_end(self, state, step):
        if state.global_step == self.step:
            self.saved = copy.deepcopy((state.state_dict(), self.model.state_dict(), self.optimizer.state_dict(),
                                        self.generator.get_state(), torch.get_rng_state()))
            raise Interrupted


def test_steps_not_yet_logged_at_a_checkpoint_are_logged_after_the_resume():
    train, val = data(), data(seed=1)
    model, optimizer, generator = setup()
    straight = Counter()
    fit(model, optimizer, train, val, epochs=2, batch_size=32, generator=generator, hooks=[straight],
        log_every_steps=3)

    model2, optimizer2, generator2 = setup()
    first, crash = Counter(), SnapshotAndCrash(5, model2, optimizer2, generator2)
    with pytest.raises(Interrupted):
        fit(model2, optimizer2, train, val, epochs=2, batch_size=32, generator=generator2, hooks=[first, crash],
            log_every_steps=3)
    loop, weights, opt, gen, rng = crash.saved
    assert loop["unlogged"]["steps"] == [4, 5] and loop["unlogged"]["values"].shape == (2, 2)

    model3, optimizer3, generator3 = setup(seed=99)
    model3.load_state_dict(weights)
    optimizer3.load_state_dict(opt)
    generator3.set_state(gen)
    torch.set_rng_state(rng)
    state = LoopState()
    state.load_state_dict(loop)
    rest = Counter()
    fit(model3, optimizer3, train, val, epochs=2, batch_size=32, generator=generator3, hooks=[rest], state=state,
        log_every_steps=3)
    assert [v.step for v in first.values] == [1, 2, 3]
    assert first.values + rest.values == straight.values
    assert rest.calls[:2] == ["start", "log3"]   # steps 4 and 5 and the resumed 6 in one interval
