import json
import math

import numpy as np
import pytest
import torch

from ml.observe.histograms import (TABLE_COLUMNS, HistogramHook, grad_norm, histogram_percentiles, read_table,
                           render_histograms)
from ml.train.loop import LoopState


class RecordingTracker:
    run_id = "run"

    def __init__(self):
        self.artifacts = []

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((str(path), artifact_path))


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def train_steps(model, hook, steps, state=None):
    """Runs ``steps`` SGD steps, calling the hook as ml.train.loop.fit does (after optimizer.step())."""
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = state or LoopState()
    norms, weights = {}, {}
    for _ in range(steps):
        loss = model(torch.randn(8, 4, generator=generator)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.global_step += 1
        norms[state.global_step] = grad_norm(model)
        weights[state.global_step] = {k: v.detach().clone() for k, v in model.named_parameters()}
        hook.on_step_end(state, loss.item())
    return norms, weights


def read_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={HISTOGRAMS: 0})
    accumulator.Reload()
    return accumulator


def test_histograms_land_in_tensorboard_event_files(tmp_path):
    model = tiny_model()
    hook = HistogramHook(model, tmp_path / "tb", every_steps=3, bins=7)
    _, weights = train_steps(model, hook, 8)
    outputs = hook.close()

    events = read_events(outputs.logdir)
    names = [name for name, _ in model.named_parameters()]
    expected_tags = {f"{kind}/{name}" for name in names for kind in ("weights", "gradients")}
    assert set(events.Tags()["histograms"]) == expected_tags
    params = dict(model.named_parameters())
    for tag in expected_tags:
        series = events.Histograms(tag)
        assert [e.step for e in series] == [3, 6]
        for event in series:
            histogram = event.histogram_value
            numel = params[tag.split("/", 1)[1]].numel()
            assert len(histogram.bucket) == 7 and len(histogram.bucket_limit) == 7
            assert sum(histogram.bucket) == numel == histogram.num
            assert histogram.min <= histogram.bucket_limit[0]
            assert histogram.bucket_limit[-1] == pytest.approx(histogram.max)
    # The record at step 6 describes the weights as they were after step 6.
    last_weight = events.Histograms("weights/0.weight")[-1].histogram_value
    assert last_weight.sum == pytest.approx(weights[6]["0.weight"].sum().item(), abs=1e-5)
    assert last_weight.min == pytest.approx(weights[6]["0.weight"].min().item())
    assert last_weight.max == pytest.approx(weights[6]["0.weight"].max().item())


def test_table_rows_match_the_event_files(tmp_path):
    model = tiny_model()
    hook = HistogramHook(model, tmp_path / "tb", every_steps=2, bins=5)
    train_steps(model, hook, 4)
    outputs = hook.close()

    rows = read_table(outputs.table)
    assert outputs.table.name == "histograms.parquet" and outputs.png.name == "histograms.png"
    assert len(rows) == 2 * 4 * 2  # records x parameters x (weights, gradients)
    assert set(rows[0]) == set(TABLE_COLUMNS)
    assert sorted({r["step"] for r in rows}) == [2, 4]
    events = read_events(outputs.logdir)
    for row in rows:
        event = next(e for e in events.Histograms(f"{row['kind']}/{row['tensor']}") if e.step == row["step"])
        assert row["counts"] == [int(c) for c in event.histogram_value.bucket]
        assert sum(row["counts"]) == row["numel"]
        assert row["min"] <= row["mean"] <= row["max"]
        assert row["std"] >= 0 and row["norm"] > 0 and row["nonfinite"] == 0
    weight = dict(model.named_parameters())["2.weight"].detach()
    last = next(r for r in rows if r["step"] == 4 and r["tensor"] == "2.weight" and r["kind"] == "weights")
    assert last["norm"] == pytest.approx(weight.norm().item(), rel=1e-5)
    assert last["std"] == pytest.approx(weight.std(correction=0).item(), rel=1e-5)
    assert outputs.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_table(tmp_path):
    model = tiny_model()
    hook = HistogramHook(model, tmp_path / "tb", every_steps=1, bins=3, table_format="json")
    train_steps(model, hook, 2)
    outputs = hook.close()
    rows = json.loads(outputs.table.read_text())
    assert outputs.table.suffix == ".json" and len(rows) == 2 * 8
    assert rows == hook.rows


def test_nothing_happens_between_marks(tmp_path):
    model = tiny_model()
    hook = HistogramHook(model, tmp_path / "tb", every_steps=10, bins=3)
    train_steps(model, hook, 9)
    assert hook.rows == [] and hook.last_step is None
    assert not (tmp_path / "tb").exists()
    outputs = hook.close()
    assert outputs.table is None and outputs.png is None


def test_last_grad_norm_is_the_global_norm_at_the_last_mark(tmp_path):
    model = tiny_model()
    hook = HistogramHook(model, tmp_path / "tb", every_steps=2, bins=3)
    norms, _ = train_steps(model, hook, 5)
    assert hook.last_step == 4
    assert hook.last_grad_norm == pytest.approx(norms[4], rel=1e-5)
    hook.close()


def test_grad_norm_matches_clip_grad_norm():
    model = tiny_model()
    assert grad_norm(model) is None
    model(torch.randn(5, 4)).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9).item()
    assert grad_norm(model) == pytest.approx(expected, rel=1e-6)
    assert grad_norm(list(model.parameters())) == pytest.approx(expected, rel=1e-6)


def test_constant_and_nonfinite_tensors(tmp_path):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.bias.zero_()
        model.weight.copy_(torch.tensor([[1.0, float("nan"), 2.0], [float("inf"), 3.0, 4.0]]))
    hook = HistogramHook(model, tmp_path / "tb", every_steps=1, bins=4)
    hook.record(1)
    rows = {r["tensor"]: r for r in hook.rows}
    bias, weight = rows["bias"], rows["weight"]
    assert bias["min"] == bias["max"] == 0.0 and bias["counts"] == [0, 0, 2, 0]
    assert (bias["hist_lo"], bias["hist_hi"]) == (-0.5, 0.5)
    assert weight["numel"] == 6 and weight["nonfinite"] == 2
    assert (weight["min"], weight["max"], weight["mean"]) == (1.0, 4.0, 2.5)
    assert sum(weight["counts"]) == 4
    hook.close()
    histogram = read_events(tmp_path / "tb").Histograms("weights/weight")[0].histogram_value
    assert histogram.num == 4 and (histogram.min, histogram.max) == (1.0, 4.0)


def test_close_logs_every_file_to_the_tracker_once(tmp_path):
    model = tiny_model()
    tracker = RecordingTracker()
    hook = HistogramHook(model, tmp_path / "tb", every_steps=1, bins=3, tracker=tracker, artifact_path="hist")
    train_steps(model, hook, 1)
    first = hook.close()
    assert hook.close() is first
    logged = {(p.rsplit("/", 1)[-1], a) for p, a in tracker.artifacts}
    assert ("histograms.parquet", "hist") in logged and ("histograms.png", "hist") in logged
    assert any(name.startswith("events.out.tfevents") for name, _ in logged)
    assert len(tracker.artifacts) == len(list((tmp_path / "tb").iterdir()))


def test_percentiles_from_bins():
    assert histogram_percentiles([0, 10, 0, 0], 0.0, 4.0, (0.0, 0.5, 1.0)) == [1.0, 1.5, 2.0]
    assert histogram_percentiles([5, 0, 0, 5], 0.0, 4.0, (0.25, 0.75)) == [0.5, 3.5]
    assert histogram_percentiles([2, 2], -1.0, 1.0, (0.5,)) == [0.0]
    assert all(math.isnan(v) for v in histogram_percentiles([0, 0], 0.0, 1.0))


def test_render_caps_the_tensor_count(tmp_path):
    from PIL import Image

    def table(names):
        rows = [(step, name) for name in names for step in (1, 2)]
        return {"step": np.array([step for step, _ in rows]), "tensor": [name for _, name in rows],
                "kind": ["weights"] * len(rows), "counts": np.array([[1 + i % 3, 2] for i in range(len(rows))]),
                "hist_lo": np.zeros(len(rows)), "hist_hi": np.ones(len(rows))}

    def size(path):  # one row of panels per tensor drawn: the height tells how many
        with Image.open(path) as image:
            return image.size

    capped = size(render_histograms(table(["a", "b", "c"]), tmp_path / "capped.png", max_tensors=1))
    first_alone = size(render_histograms(table(["a"]), tmp_path / "a.png"))
    uncapped = size(render_histograms(table(["a", "b", "c"]), tmp_path / "all.png", max_tensors=3))
    two = size(render_histograms(table(["a", "b", "c"]), tmp_path / "two.png", max_tensors=2))
    assert capped == first_alone
    assert capped[1] < two[1] < uncapped[1]


@pytest.mark.parametrize("kwargs, message", [
    ({"every_steps": 0}, "every_steps: expected an integer >= 1, got 0"),
    ({"every_steps": 1, "bins": 0}, "bins: expected an integer >= 1, got 0"),
    ({"every_steps": 1, "table_format": "csv"}, "table_format: expected one of parquet, json, got 'csv'"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        HistogramHook(tiny_model(), tmp_path, **kwargs)
