import json

import pandas as pd
import pytest
import torch
import yaml

from ml.config import TrainConfig, build_section
from ml.errors import ConfigError
from ml.model.architectures import MLP, ModelSpec
from ml.tracking.base import NullTracker
from ml.train.loop import Callback, fit, seed_everything
from ml.train.memory import (EVENTS_ARTIFACT, MemoryExhausted, MemoryGuard, sample_memory,
                             split_micro_batches)
from ml.train.stage import train as stage_train
from ml.train.step import StepOutput
from tests.conftest import REPO

CPU = torch.device("cpu")
MIB = 1024 * 1024


def data(n=200, features=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return x, ((x[:, 0] > 0).long() + (x[:, 1] > 1).long())


class Recorder(NullTracker):
    def __init__(self):
        self.metrics, self.tags, self.texts = [], {}, {}

    def log_metric(self, key, value, step):
        self.metrics.append((key, step, value))

    def log_metrics(self, metrics, step):
        self.metrics += [(k, step, v) for k, v in metrics.items()]

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_text(self, text, artifact_file):
        self.texts[artifact_file] = text


class StepInputs(Callback):
    """The inputs of every forward pass, grouped by the optimizer step they belong to."""

    def __init__(self, model):
        self.steps, self._current = [], []
        model.register_forward_pre_hook(lambda module, args: self._current.append(args[0].clone())
                                        if module.training else None)

    def on_step_end(self, state, step):
        self.steps.append(self._current)
        self._current = []


def train(guard=None, epochs=2, batch_size=32, accumulate_steps=1, tracker=None):
    generator = seed_everything(5)
    model = MLP(ModelSpec(8, (16,), 3, 0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    inputs = StepInputs(model)
    hooks = [inputs] + ([guard] if guard is not None else [])
    model.train()
    state = fit(model, optimizer, data(), data(seed=1), epochs=epochs, batch_size=batch_size, generator=generator,
                hooks=hooks, accumulate_steps=accumulate_steps, memory_guard=guard, tracker=tracker)
    return model, state, inputs


@pytest.mark.parametrize("accumulate_steps", [1, 2])
def test_low_rss_limit_halves_the_micro_batch_and_every_step_sees_the_same_samples(accumulate_steps):
    plain_model, plain_state, plain = train(accumulate_steps=accumulate_steps)
    tracker = Recorder()
    # limits as fractions of 1 MiB: the test process's real RSS is far above both
    guard = MemoryGuard(4, 0.5, 0.9, device=CPU, tracker=tracker, limit_base=MIB)
    model, state, guarded = train(guard, accumulate_steps=accumulate_steps, tracker=tracker)

    assert state.global_step == plain_state.global_step
    assert guard.split == 2 ** (state.global_step // 4)
    for step, (a, b) in enumerate(zip(plain.steps, guarded.steps), start=1):
        assert torch.equal(torch.cat(a), torch.cat(b))   # the same samples, in the same order
        split = 2 ** (step // 4)
        assert len(b) == sum(min(split, len(x)) for x in a)   # each micro-batch in `split` pieces
        assert max(len(x) for x in b) == max(-(-len(x) // split) for x in a)
    for name, value in plain_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert [e["kind"] for e in guard.events] == ["collect", "shrink"] * (state.global_step // 4)
    first = guard.events[1]
    assert first["step"] == 4 and first["micro_batch"] == [32, 16]
    assert first["micro_batches_per_step"] == [accumulate_steps, 2 * accumulate_steps]
    assert first["figures"]["rss"] > MIB
    assert {k for k, s, _ in tracker.metrics if s == 4} >= {"memory/rss_mb", "memory/system_used_fraction",
                                                            "memory/usage_fraction", "memory/micro_batch_split"}
    assert [json.loads(line)["kind"] for line in tracker.texts[EVENTS_ARTIFACT].splitlines()] == \
        [e["kind"] for e in guard.events]


def test_above_the_soft_limit_only_collects_garbage():
    rss = sample_memory(CPU).rss
    guard = MemoryGuard(2, 0.01, 1.0, device=CPU, limit_base=4 * rss)   # usage about 0.25
    train(guard, epochs=1)
    assert guard.split == 1
    kinds = {e["kind"] for e in guard.events}
    assert kinds == {"collect"}
    event = guard.events[0]
    assert event["before"]["rss"] > 0 and event["after"]["rss"] > 0 and event["step"] == 2


def test_micro_batches_that_cannot_shrink_stop_with_one_line_naming_the_figures():
    guard = MemoryGuard(1, 0.5, 0.9, device=CPU, limit_base=MIB)
    with pytest.raises(MemoryExhausted) as raised:
        train(guard, batch_size=4)
    message = str(raised.value)
    assert "\n" not in message and "cannot shrink" in message and "at step 3" in message
    assert "RSS" in message and "usage" in message and "train.batch_size" in message
    assert guard.split == 4


def test_out_of_memory_inside_the_step_retries_it_on_halves():
    calls = []

    def step(batches):
        calls.append([len(y) for _, y in batches])
        if len(calls) < 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return StepOutput(torch.tensor(0.5), torch.tensor(1.0), torch.tensor(3), sum(len(y) for _, y in batches))

    guard = MemoryGuard(1000, 0.5, 0.9, device=CPU, limit_base=1 << 40)
    x, y = data(12)
    out = guard.run_step(step, [(x[:8], y[:8]), (x[8:], y[8:])], 1)
    assert calls == [[8, 4], [4, 4, 2, 2], [2, 2, 2, 2, 1, 1, 1, 1]]
    assert out.samples == 12 and guard.split == 4
    assert [e["reason"].startswith("CUDA out of memory") for e in guard.events] == [True, True]


def test_split_state_round_trips_through_a_checkpoint():
    guard = MemoryGuard(1, 0.5, 0.9, device=CPU, limit_base=MIB)
    guard.split = 4
    guard.events.append({"kind": "shrink", "step": 3, "reason": "r", "micro_batch": [8, 4]})
    state = guard.state_dict()
    assert all(isinstance(v, (int, str)) for v in state.values())   # JSON scalars in a checkpoint
    again = MemoryGuard(1, 0.5, 0.9, device=CPU, limit_base=MIB)
    again.load_state_dict(state)
    assert again.split == 4 and again.events == guard.events


def test_split_keeps_order_and_leaves_no_empty_piece():
    x = torch.arange(5).float().unsqueeze(1)
    y = torch.arange(5)
    pieces = split_micro_batches([(x[:3], y[:3]), (x[3:], y[3:])], 4)
    assert [p[1].tolist() for p in pieces] == [[0], [1], [2], [3], [4]]
    assert split_micro_batches([(x, y)], 1)[0][1] is y


@pytest.mark.parametrize("memory, message", [
    ({"soft_limit": 0.0}, "train.memory.soft_limit: expected a fraction in (0, 1]"),
    ({"hard_limit": 1.5}, "train.memory.hard_limit: expected a fraction in (0, 1]"),
    ({"soft_limit": 0.9, "hard_limit": 0.8}, "train.memory.soft_limit: expected a value <= train.memory.hard_limit, got 0.9 > 0.8"),
    ({"check_every_steps": 0}, "train.memory.check_every_steps: expected"),
    ({"limit": 3}, "train.memory.limit: unknown key"),
])
def test_bad_memory_limits_are_one_line_config_errors(memory, message):
    train_section = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    with pytest.raises(ConfigError) as raised:
        build_section(TrainConfig, "train", {**train_section, "memory": {**train_section["memory"], **memory}})
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_bad_guard_arguments_are_refused():
    with pytest.raises(ValueError, match="0 < soft <= hard <= 1"):
        MemoryGuard(1, 0.9, 0.5, device=CPU)
    with pytest.raises(ValueError, match="check_every_steps"):
        MemoryGuard(0, 0.5, 0.9, device=CPU)


def test_the_train_stage_runs_the_guard_from_params(tmp_path):
    processed = tmp_path / "processed"
    processed.mkdir()
    for name, rows in (("train", 48), ("val", 16)):
        x, y = data(rows, seed=rows)
        frame = pd.DataFrame(x.numpy(), columns=[f"f{i}" for i in range(8)])
        frame["label"] = [("a", "b", "c")[i] for i in y.tolist()]
        frame.to_parquet(processed / f"{name}.parquet", index=False)
    (processed / "schema.json").write_text(json.dumps(
        {"features": [f"f{i}" for i in range(8)], "classes": ["a", "b", "c"], "source": "synthetic"}))
    cfg = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    cfg.update(hidden_sizes=[16], batch_size=4, epochs=1, model_dir=str(tmp_path / "model"), optimize="off",
               run_file=str(tmp_path / "run.json"), metrics_file=str(tmp_path / "metrics.json"), loader="memory",
               # limits no process stays under: the guard shrinks at each step until it cannot
               memory={"check_every_steps": 1, "soft_limit": 1e-9, "hard_limit": 1e-9})
    tracker = Recorder()
    with pytest.raises(MemoryExhausted, match=r"^memory: usage above train.memory.hard_limit 1e-09 at step 3 "):
        stage_train(TrainConfig(**cfg), processed, tracker)
    assert tracker.tags["memory.micro_batch_split"] == 4
    assert [json.loads(line)["kind"] for line in tracker.texts[EVENTS_ARTIFACT].splitlines()] == ["collect", "shrink"] * 2 + ["collect"]
