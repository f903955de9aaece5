"""The pure-logic parts of DDP training (ml.train.distributed): the rank torchrun made us, backend
and rank-count checks, the launch command, which failed rank is the cause; and, in a one-rank
gloo process group, the collectives the loop uses, DDP's gradient sync once per accumulated step,
and the metric reductions of the loop."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ml.errors import ConfigError
from ml.train.distributed import (RankInfo, RankSync, all_ranks_true, check_nproc, gather_digests, grad_sync,
                                  launch_command, launched_rank, lost_peer, resolve_backend, root_failure,
                                  weights_digest, wrap_model)
from ml.train.loop import evaluate_split, fit
from ml.train.step import train_step

CPU = torch.device("cpu")


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"RANK": "0"}, None),
    ({"RANK": "1", "WORLD_SIZE": "2"}, RankInfo(1, 2, 1, 2)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, RankInfo(3, 4, 1, 2)),
])
def test_launched_rank_reads_torchruns_environment(env, expected):
    assert launched_rank(env) == expected


@pytest.mark.parametrize(("backend", "device", "expected"), [
    (None, "cpu", "gloo"), (None, "cuda", "nccl"), ("gloo", "cuda", "gloo"), ("gloo", "cpu", "gloo"),
    ("nccl", "cuda", "nccl"),
])
def test_backend_follows_the_device_unless_set(backend, device, expected):
    assert resolve_backend(backend, torch.device(device)) == expected


def test_nccl_on_the_cpu_is_one_line():
    with pytest.raises(ConfigError, match=r"^train.distributed.backend: expected gloo when training on the cpu "
                                          r"\(nccl needs CUDA devices\), got 'nccl'$"):
        resolve_backend("nccl", CPU)


def test_more_ranks_than_slots_is_one_line():
    check_nproc(2, 2, "CPU cores available")
    with pytest.raises(ConfigError) as err:
        check_nproc(3, 2, "CPU cores available")
    assert str(err.value) == ("train.distributed.nproc_per_node: expected at most 2 (the CPU cores available on "
                              "this machine), got 3")


def test_launch_command_runs_torchruns_entry_standalone():
    cmd = launch_command(2, "tasks.train", ["--params", "p.yaml", "--fresh"], python="py")
    assert cmd == ["py", "-m", "ml.train.distributed", "--standalone", "--nproc_per_node", "2",
                   "-m", "tasks.train", "--params", "p.yaml", "--fresh"]


def failure(exitcode: int, timestamp: int) -> SimpleNamespace:
    return SimpleNamespace(exitcode=exitcode, timestamp=timestamp,
                           signal_name=lambda: signal.Signals(-exitcode).name)


@pytest.mark.parametrize(("failures", "expected"), [
    ({1: failure(-9, 5)}, "rank 1 was killed by SIGKILL"),
    ({0: failure(143, 4), 1: failure(-9, 5)}, "rank 1 was killed by SIGKILL"),   # rank 0 was stopped for it
    ({0: failure(-15, 4), 1: failure(2, 6)}, "rank 1 exited with code 2"),
    ({0: failure(1, 7), 1: failure(2, 6)}, "rank 1 exited with code 2"),        # the earliest
    ({0: failure(143, 3), 1: failure(143, 3)}, "rank 0 exited with code 143"),  # only stopped ranks
])
def test_the_root_failure_is_the_first_rank_that_was_not_stopped_for_another(failures, expected):
    assert root_failure(failures) == expected


def test_a_lost_peer_is_a_distributed_error_or_glooss_transport():
    assert lost_peer(RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error: Connection reset"))
    assert lost_peer(dist.DistBackendError("NCCL communicator was aborted"))
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_the_weights_digest_sees_every_value_and_dtype():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    same = nn.Linear(4, 3)
    same.load_state_dict(model.state_dict())
    assert weights_digest(model) == weights_digest(same)
    with torch.no_grad():
        same.weight[2, 3] = torch.nextafter(same.weight[2, 3], torch.tensor(1.0))
    assert weights_digest(model) != weights_digest(same)
    assert weights_digest(model) != weights_digest(nn.Linear(4, 3).double().requires_grad_(False))


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A gloo process group of this process alone: DDP and the collectives run as on every rank."""
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield RankSync(0, 1, CPU)
    dist.destroy_process_group()


def test_collectives_of_one_rank(one_rank_group):
    sync = one_rank_group
    assert torch.equal(sync.sum(torch.tensor([1.5, 2.0])), torch.tensor([1.5, 2.0]))
    assert sync.any(True) and not sync.any(False)
    assert torch.equal(all_ranks_true(torch.tensor([True, False])), torch.tensor([True, False]))
    digest = weights_digest(nn.Linear(2, 2))
    assert gather_digests(sync, digest) == [digest]


def test_ddp_syncs_gradients_once_per_accumulated_step_and_matches_the_plain_step(one_rank_group):
    ddp_syncs_once_per_accumulated_step(CPU)


def ddp_syncs_once_per_accumulated_step(device: torch.device) -> None:
    """In a one-rank process group on ``device``: DDP all-reduces once per step of three
    micro-batches (a comm hook counts the buckets), and the step equals the plain one."""
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    wrapped = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    wrapped.load_state_dict(plain.state_dict())
    ddp = wrap_model(wrapped, device)
    syncs = []

    def count(state, bucket):
        syncs.append(bucket.index())
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, count)
    batches = [(torch.randn(5, 6, device=device), torch.randint(0, 3, (5,), device=device)) for _ in range(3)]
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(2):
        out_plain = train_step(plain, opt_plain, batches)
        out_ddp = train_step(ddp, opt_ddp, batches)
    assert syncs == [0, 0]  # one bucket, one all-reduce per step (two steps of three micro-batches)
    assert torch.equal(out_plain.loss, out_ddp.loss) and not out_ddp.skipped
    for key, value in plain.state_dict().items():
        assert torch.equal(value, wrapped.state_dict()[key]), key


def test_grad_sync_is_a_no_op_without_ddp():
    with grad_sync(nn.Linear(2, 2), last=False):
        pass


class OtherRank:
    """A RankSync stand-in: this rank plus one other whose sums and stop decisions are given."""

    def __init__(self, other_sums: list[torch.Tensor] = (), stop_at_call: int | None = None) -> None:
        self.other_sums, self.stop_at_call, self.calls = list(other_sums), stop_at_call, 0
        self.world_size, self.device = 2, CPU

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + self.other_sums.pop(0) if self.other_sums else tensor * 2

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.sum(tensor) / 2

    def any(self, flag: bool) -> bool:
        self.calls += 1
        return flag or self.calls == self.stop_at_call


def test_validation_over_two_shards_equals_the_whole_split():
    torch.manual_seed(2)
    model = nn.Linear(5, 4)
    x, y = torch.randn(11, 5), torch.randint(0, 4, (11,))
    whole = evaluate_split(model, x, y)
    other = torch.tensor([torch.nn.functional.cross_entropy(model(x[1::2]), y[1::2], reduction="sum").item(),
                          (model(x[1::2]).argmax(1) == y[1::2]).sum().item(), len(x[1::2])], dtype=torch.float64)
    shard = evaluate_split(model, x[0::2], y[0::2], sync=OtherRank([other]))
    assert shard["accuracy"] == whole["accuracy"]
    assert shard["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_a_stop_on_another_rank_stops_this_one_after_the_same_step():
    torch.manual_seed(3)
    model = nn.Linear(5, 3)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    state = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), (x, y), epochs=2, batch_size=8,
                generator=torch.Generator().manual_seed(0), sync=OtherRank(stop_at_call=3))
    assert state.stop and state.global_step == 3 and state.batch_in_epoch == 3
