import copy
import itertools
import json
import logging
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ml.config import TrainConfig
from ml.errors import DataError
from ml.settings import CheckpointConfig
from ml.model.architectures import MLP, ModelSpec
from ml.tracking.base import NullTracker
from ml.train.batches import (MemoryBatches, ParquetBatches, ParquetSplit, choose_loader, data_wait_advice,
                              shard_order, worker_count)
from ml.train.checkpoints import CheckpointContext
from ml.train.loop import Callback, LoopState, fit, seed_everything
from ml.train.stage import train
from tests.conftest import REPO


def tensors(n=50, features=3):
    x = torch.arange(n * features, dtype=torch.float32).reshape(n, features)
    return x, torch.arange(n)


def test_memory_batches_index_a_seeded_permutation_in_order():
    x, y = tensors()
    source = MemoryBatches(x, y, 16, torch.Generator().manual_seed(7))
    expected_order = torch.randperm(50, generator=torch.Generator().manual_seed(7))
    got = list(source)
    assert len(source) == len(got) == 4
    assert [len(t) for _, t in got] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([t for _, t in got]), expected_order)
    assert all(torch.equal(bx, x[by]) for bx, by in got)
    second = torch.cat([t for _, t in source])   # the next epoch draws a new permutation
    assert sorted(second.tolist()) == list(range(50)) and not torch.equal(second, expected_order)


def test_resume_mid_epoch_from_state_dict_draws_the_same_batches():
    x, y = tensors()
    straight = MemoryBatches(x, y, 8, torch.Generator().manual_seed(3))
    first = iter(straight)
    next(first)
    assert len([t for _, t in straight]) == 6   # iter() again continues the epoch where it stands
    batches = iter(straight)   # epoch 2
    cut = [next(batches)[1] for _ in range(3)]
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in straight.state_dict().items()}
    assert state["position"] == 3
    rest_straight = [t for _, t in batches]

    resumed = MemoryBatches(x, y, 8, torch.Generator().manual_seed(999))   # another generator state
    resumed.load_state_dict(state)
    rest = [t for _, t in resumed]
    assert all(torch.equal(a, b) for a, b in zip(rest, rest_straight)) and len(rest) == len(rest_straight) == 4
    assert len(cut) == 3


@pytest.mark.parametrize("n, world", [(50, 2), (50, 3), (7, 4), (2, 5)])
def test_ranks_take_disjoint_padded_shards_of_one_permutation(n, world):
    x, y = tensors(n)
    shards = []
    for rank in range(world):
        source = MemoryBatches(x, y, 4, torch.Generator().manual_seed(11), rank=rank, world_size=world)
        shards.append(torch.cat([t for _, t in source]).tolist())
        assert len(source) == -(-(-(-n // world)) // 4)
    sizes = {len(s) for s in shards}
    assert sizes == {-(-n // world)}   # every rank the same number of samples, so the same number of batches
    order = torch.randperm(n, generator=torch.Generator().manual_seed(11)).tolist()
    padded = list(itertools.islice(itertools.cycle(order), len(shards[0]) * world))
    assert [padded[i] for rank in range(world) for i in range(rank, len(padded), world)] == \
        [v for s in shards for v in s]
    if n % world == 0:
        assert sorted(v for s in shards for v in s) == list(range(n))


def test_single_rank_shard_is_the_permutation_itself():
    order = torch.randperm(10)
    assert shard_order(order, 0, 1) is order


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 2, "world_size": 2}, "0 <= rank < world_size"),
    ({"rank": 0, "world_size": 0}, "0 <= rank < world_size"),
])
def test_bad_shard_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryBatches(*tensors(), 4, torch.Generator(), **kwargs)


@pytest.mark.parametrize("state, match", [
    ({"position": 3, "epoch_generator_state": None}, "needs the epoch's generator state"),
    ({"position": 99, "epoch_generator_state": torch.Generator().get_state()}, r"position in \[0, 13\]"),
])
def test_bad_state_is_refused(state, match):
    source = MemoryBatches(*tensors(), 4, torch.Generator())
    with pytest.raises(ValueError, match=match):
        source.load_state_dict(state)


# -- the dataloader path: a Parquet split streamed a row group at a time -----------------------------

ROWS, FEATURES, GROUP, CLASSES = 300, 6, 37, ("a", "b", "c")


def write_split(path, rows=ROWS, seed=0, group=GROUP):
    """Feature f0 is the row's id, so a batch says which rows it holds."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    x[:, 0] = np.arange(rows)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(FEATURES)])
    frame["label"] = [CLASSES[i] for i in ((x[:, 1] > 0).astype(int) + (x[:, 2] > 0.5).astype(int)) % 3]
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=group)
    return x


@pytest.fixture(scope="module")
def split_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "train.parquet"
    return path, write_split(path)


def parquet_split(path):
    return ParquetSplit(path, [f"f{i}" for i in range(FEATURES)], CLASSES)


def epochs_of(source, epochs):
    return [[(x[:, 0].long(), y) for x, y in source] for _ in range(epochs)]


def test_parquet_batches_hold_every_row_once_an_epoch_in_a_seeded_order(split_file):
    path, x = split_file
    split = parquet_split(path)
    assert split.group_rows == [37] * 8 + [4] and split.rows == ROWS and split.nbytes == ROWS * (4 * FEATURES + 8)
    source = ParquetBatches(split, 32, torch.Generator().manual_seed(1), device=torch.device("cpu"))
    first, second = epochs_of(source, 2)
    assert len(source) == len(first) == 10 and [len(ids) for ids, _ in first] == [32] * 9 + [12]
    for epoch in (first, second):
        assert sorted(torch.cat([ids for ids, _ in epoch]).tolist()) == list(range(ROWS))
    assert not torch.equal(torch.cat([i for i, _ in first]), torch.cat([i for i, _ in second]))
    labels = split.labels()
    assert all(torch.equal(y, torch.from_numpy(labels)[ids]) for ids, y in first)
    again = ParquetBatches(split, 32, torch.Generator().manual_seed(1), device=torch.device("cpu"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, epochs_of(again, 1)[0]))


def test_two_workers_read_the_same_batches_as_the_training_process(split_file):
    split = parquet_split(split_file[0])
    inline = ParquetBatches(split, 16, torch.Generator().manual_seed(4), device=torch.device("cpu"))
    workers = ParquetBatches(split, 16, torch.Generator().manual_seed(4), device=torch.device("cpu"), num_workers=2,
                             persistent_workers=True, prefetch_factor=3)
    a, b = epochs_of(inline, 2), epochs_of(workers, 2)
    assert workers.num_workers == 2
    assert [torch.cat([i for i, _ in e]).tolist() for e in a] == [torch.cat([i for i, _ in e]).tolist() for e in b]


def test_ranks_read_disjoint_batches_and_as_many_each(split_file):
    split = parquet_split(split_file[0])
    per_rank = [epochs_of(ParquetBatches(split, 32, torch.Generator().manual_seed(2), device=torch.device("cpu"),
                                         rank=r, world_size=3), 1)[0] for r in range(3)]
    assert [len(b) for b in per_rank] == [4, 4, 4]   # 10 batches padded to 12
    ids = [torch.cat([i for i, _ in b]).tolist() for b in per_rank]
    whole = torch.cat([i for i, _ in epochs_of(ParquetBatches(split, 32, torch.Generator().manual_seed(2),
                                                              device=torch.device("cpu")), 1)[0]]).tolist()
    batches = [whole[i:i + 32] for i in range(0, ROWS, 32)] + [whole[:32], whole[32:64]]
    assert ids == [sum(batches[r::3], []) for r in range(3)]


def test_a_row_group_read_equals_the_frame_read_of_the_same_rows(split_file):
    path, x = split_file
    features, labels = parquet_split(path).read_group(1)
    frame = pd.read_parquet(path).iloc[GROUP:2 * GROUP]
    assert features.dtype == np.float32 and np.array_equal(features, x[GROUP:2 * GROUP])
    assert labels.tolist() == [CLASSES.index(v) for v in frame["label"]]


@pytest.mark.parametrize(("change", "message"), [
    (lambda f: f.drop(columns=["f3"]), "columns f3 of the contract are missing"),
    (lambda f: f.assign(f2="x"), "non-numeric feature values"),
    (lambda f: f.assign(label="z"), r"labels \['z'\] are outside the contract's class list"),
], ids=["missing-column", "text-feature", "unknown-label"])
def test_a_row_group_outside_the_contract_is_one_line(tmp_path, change, message):
    path = tmp_path / "train.parquet"
    frame = pd.DataFrame(np.zeros((4, FEATURES), np.float32), columns=[f"f{i}" for i in range(FEATURES)])
    change(frame.assign(label="a")).to_parquet(path, index=False)
    with pytest.raises(DataError, match=rf"^{path} row group 0: {message}"):
        parquet_split(path).read_group(0)


def _niceness_of_a_worker() -> int:
    from ml.train.batches import _lower_priority

    _lower_priority(0)
    return os.nice(0)


def test_dataloader_workers_run_below_the_training_process_priority():
    import concurrent.futures
    import multiprocessing

    from ml.train.batches import WORKER_NICENESS

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(_niceness_of_a_worker).result() == min(os.nice(0) + WORKER_NICENESS, 19)


def test_streamed_statistics_labels_and_head_match_the_whole_split(split_file):
    path, x = split_file
    split = parquet_split(path)
    mean, std = split.input_stats()
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, x.std(axis=0), rtol=1e-5)
    rows = split.stats_rows()
    np.testing.assert_allclose(rows.mean(axis=0), mean, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(rows.std(axis=0), std, rtol=1e-5)
    head_x, head_y = split.head(50)
    np.testing.assert_array_equal(head_x, x[:50])
    assert len(head_y) == 50 and np.array_equal(split.labels()[:50], head_y)


def test_parquet_resume_mid_epoch_with_two_workers_equals_a_straight_run(split_file):
    split = parquet_split(split_file[0])

    def run(stop_at=None, state=None, snapshot=None):
        generator = seed_everything(3)
        model = MLP(ModelSpec(FEATURES, (16,), 3, 0.2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        if snapshot is not None:
            torch.manual_seed(999)   # a resumed process starts from other RNG states
            model.load_state_dict(snapshot["model"])
            optimizer.load_state_dict(snapshot["optimizer"])
            generator.set_state(snapshot["generator"])
            torch.set_rng_state(snapshot["rng"])
        source = ParquetBatches(split, 64, generator, device=torch.device("cpu"), num_workers=2,
                                persistent_workers=True)
        losses = Losses(stop_at)
        out = fit(model, optimizer, source, VAL, epochs=2, hooks=[losses], state=state)
        return model, optimizer, generator, out, losses.values

    straight_model, *_, straight = run()
    model, optimizer, generator, state, first = run(stop_at=7)   # 5 batches an epoch: mid-epoch 2
    assert state.batch_in_epoch == 2 and len(straight) == 10
    snapshot = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
                "generator": generator.get_state(), "rng": torch.get_rng_state()}
    saved = LoopState()
    saved.load_state_dict(copy.deepcopy(state.state_dict()))
    saved.stop = False
    resumed_model, *_, rest = run(state=saved, snapshot=snapshot)
    assert first + rest == straight
    assert all(torch.equal(straight_model.state_dict()[k], v) for k, v in resumed_model.state_dict().items())


class Losses(Callback):
    def __init__(self, stop_at=None):
        self.values, self.stop_at = [], stop_at

    def on_log(self, state, values):
        self.values += [v.loss for v in values]
        if state.global_step == self.stop_at:
            state.stop = True


VAL = (torch.randn(40, FEATURES, generator=torch.Generator().manual_seed(8)), torch.arange(40) % 3)


@pytest.mark.parametrize("loader, size, expected", [
    ("auto", 400, "memory"), ("auto", 600, "dataloader"), ("memory", 10**12, "memory"),
    ("dataloader", 1, "dataloader")])
def test_auto_takes_memory_when_the_split_fits_the_budget(loader, size, expected):
    choice = choose_loader(loader, size, 0.5, torch.device("cpu"), memory=1000)
    assert choice.name == expected
    if loader == "auto":
        assert ("fits" if expected == "memory" else "exceeds") in choice.reason and "train.memory_budget" in choice.reason


def test_more_workers_than_cores_warns_once_with_the_number_used(caplog):
    cores = len(os.sched_getaffinity(0))
    with caplog.at_level(logging.WARNING, logger="ml.train.batches"):
        assert worker_count(cores + 5) == cores
        assert worker_count(cores) == cores
    assert [r.getMessage() for r in caplog.records] == \
        [f"train.num_workers: {cores + 5} is above the {cores} cores available; using {cores}"]


def test_data_wait_advice_names_the_setting_to_change(split_file):
    streamed = ParquetBatches(parquet_split(split_file[0]), 32, torch.Generator(), device=torch.device("cpu"))
    assert data_wait_advice(0.1, streamed) is None and data_wait_advice(None, streamed) is None
    assert "train.num_workers" in data_wait_advice(0.6, streamed) and "60%" in data_wait_advice(0.6, streamed)
    memory = MemoryBatches(*tensors(), 4, torch.Generator())
    assert "train.loader: dataloader" in data_wait_advice(0.6, memory)


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """A prepared dataset whose training split has row groups of 37 rows."""
    directory = tmp_path_factory.mktemp("processed")
    x = write_split(directory / "train.parquet")
    write_split(directory / "val.parquet", rows=60, seed=1)
    (directory / "schema.json").write_text(json.dumps(
        {"features": [f"f{i}" for i in range(FEATURES)], "classes": list(CLASSES), "source": "synthetic"}))
    return directory, x


def stage_config(tmp_path, **overrides):
    cfg = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    cfg.update(hidden_sizes=[16], batch_size=32, epochs=3, lr=0.01, model_dir=str(tmp_path / "model"),
               run_file=str(tmp_path / "run.json"), metrics_file=str(tmp_path / "metrics.json"), optimize="off")
    cfg.update(overrides)
    return TrainConfig(**cfg)


def test_a_split_above_the_memory_budget_trains_through_the_dataloader(tmp_path, processed, capsys):
    directory, x = processed
    tracker = Tags()
    # a budget of a few bytes: no split fits
    result = train(stage_config(tmp_path, loader="auto", memory_budget=1e-9, num_workers=2), directory, tracker)
    assert tracker.tags["loader"] == "dataloader" and "exceeds train.memory_budget" in tracker.tags["loader.reason"]
    assert "train: batches from dataloader: the split" in capsys.readouterr().out
    assert result.state.global_step == 3 * 10 and [h["epoch"] for h in result.state.history] == [1, 2, 3]
    assert result.state.history[-1]["train_loss"] < result.state.history[0]["train_loss"]
    np.testing.assert_allclose(result.model.mean.numpy(), x.mean(axis=0), rtol=1e-4, atol=1e-3)


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, step):
        if state.global_step == self.step:
            state.stop = True


def test_the_stage_resumes_a_dataloader_run_from_its_checkpoint_bit_for_bit(tmp_path, processed):
    directory, _ = processed
    cfg = stage_config(tmp_path, loader="dataloader", num_workers=2, epochs=2, restore_best=None)
    straight = train(cfg, directory).model.state_dict()

    ckpt = CheckpointContext(CheckpointConfig(dir=str(tmp_path / "ckpt"), every_steps=4, monitor=()), "f" * 16)
    train(cfg, directory, hooks=[StopAt(14)], checkpoints=ckpt)   # newest checkpoint: step 12, 2 batches into epoch 2
    resumed = train(cfg, directory, checkpoints=ckpt)
    assert resumed.resumed_from is not None and "step 12, batch 2 of the epoch" in resumed.resume_note
    assert all(torch.equal(straight[k], v) for k, v in resumed.model.state_dict().items())


class Tags(NullTracker):
    def __init__(self):
        self.tags = {}

    def set_tags(self, tags):
        self.tags.update(tags)
