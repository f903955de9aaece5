import itertools

import pytest
import torch

from ml.train.batches import MemoryBatches, shard_order


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
