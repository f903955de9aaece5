"""The GPU paths of checkpointing: page-locked host buffers, the device-to-host copy of the
optimizer's tensors on a side stream that the next ``optimizer.step()`` is ordered after, and the
CUDA RNG states. Skipped, with the reason, where there is no CUDA device."""

from __future__ import annotations

import pytest
import torch

from ml.checkpoint.manager import CheckpointManager
from ml.checkpoint.snapshot import snapshot_state
from ml.checkpoint.state import capture_rng_state, restore_rng_state, training_state
from ml.train.loop import LoopState

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())")]

DEVICE = torch.device("cuda", 0)


def big_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Large enough (~200 MB of state) that the device-to-host copy is still running when the
    next step is launched."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(4)]).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step(model, optimizer)  # AdamW's moments exist from here on
    return model, optimizer


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(256, 2048, device=DEVICE)).square().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def test_cuda_tensors_are_copied_into_page_locked_host_buffers():
    state = {"model": {"w": torch.randn(1024, 1024, device=DEVICE)}, "cpu": {"x": torch.arange(10)}}
    buffers: dict = {}
    snapshot = snapshot_state(state, buffers)
    snapshot.complete()
    assert buffers["model.safetensors"].pinned and buffers["model.safetensors"].tensor.is_pinned()
    assert not buffers["cpu.safetensors"].pinned  # CPU-only files need no page-locked memory
    again = snapshot_state(state, buffers)  # the next snapshot reuses the registered buffer
    again.complete()
    assert buffers["model.safetensors"].pinned


def test_the_next_optimizer_step_is_ordered_after_the_side_stream_copy(tmp_path):
    model, optimizer = big_model()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
    with CheckpointManager(tmp_path) as mgr:
        snapshot = training_state(model, optimizer, loop=LoopState(global_step=1).state_dict(),
                                  generator=torch.Generator())
        future = mgr.save_training_checkpoint(snapshot, 1, optimizer=optimizer)
        assert mgr._inflight.snapshot.has_deferred  # the optimizer's tensors go on the side stream
        step(model, optimizer)  # launched at once: the stream waits for the copy, the host does not
        torch.cuda.synchronize()
        assert not torch.equal(model[0].weight, before["0.weight"])
        future.result()
        saved = mgr.load_checkpoint("training", "step-00000001")
    for key, value in before.items():
        assert torch.equal(saved["model"][key], value.cpu()), key
    first = saved["optimizer"]["state"][0]
    assert torch.equal(first["exp_avg"], moments["exp_avg"].cpu())
    assert torch.equal(first["exp_avg_sq"], moments["exp_avg_sq"].cpu())


def test_a_tensor_changed_on_the_current_stream_after_the_call_is_saved_as_it_was(tmp_path):
    live = {"model": {"w": torch.zeros(4096, 4096, device=DEVICE)}}
    with CheckpointManager(tmp_path) as mgr:
        future = mgr.save_training_checkpoint(live, 1)
        live["model"]["w"].add_(1.0)  # queued after the copy on the same stream
        future.result()
        saved = mgr.load_checkpoint("training", "step-00000001")["model"]["w"]
    assert torch.count_nonzero(saved) == 0


def test_cuda_rng_states_round_trip_through_a_checkpoint(tmp_path):
    torch.cuda.manual_seed_all(7)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save_training_checkpoint({"rng": capture_rng_state()}, 1).result()
        expected = torch.rand(8, device=DEVICE)
        torch.cuda.manual_seed_all(99)
        rng = mgr.load_checkpoint("training", "step-00000001")["rng"]
    assert len(rng["cuda"]) == torch.cuda.device_count()
    restore_rng_state(rng)
    assert torch.equal(torch.rand(8, device=DEVICE), expected)
