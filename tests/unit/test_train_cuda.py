"""The train stage and the DDP collectives on a CUDA device: each precision (fp16 with its
GradScaler), the compiled forward, gradient accumulation, the streaming dataloader with page-locked
batches, ``optimize: auto`` measuring on the GPU, an interrupted run resumed to the same weights,
and a one-rank NCCL process group running the loop's collectives and DDP's once-per-step gradient
sync. Skipped, with the reason, where there is no CUDA device."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from ml.settings import CheckpointConfig
from ml.train.checkpoints import CheckpointContext
from ml.train.distributed import RankSync, all_ranks_true, gather_digests, weights_digest
from ml.train.stage import train
from tests.unit.test_restore_best import CrashAt, Interrupted, equal, saved
from tests.unit.test_train_distributed import ddp_syncs_once_per_accumulated_step
from tests.unit.test_rollback import Recorder, processed, train_config  # noqa: F401 - processed is a fixture

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())")]

CUDA = torch.device("cuda", 0)


def cuda_config(tmp_path, **overrides):
    """The synthetic split's stage config on CUDA, every speed switch set by hand unless overridden."""
    base = dict(device="cuda", epochs=4, optimize="off", precision="fp32", compile="off", loader="memory")
    return train_config(tmp_path, **{**base, **overrides})


def learned(result) -> None:
    """The run trained: the loss fell, the validation accuracy is well above chance (1/3), and the
    weights it saved are float32 whatever the precision it trained in."""
    history = result.state.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] > 0.6
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_stage_trains_on_cuda_in_each_precision(processed, tmp_path, precision):  # noqa: F811
    result = train(cuda_config(tmp_path, precision=precision), processed, Recorder())
    learned(result)
    assert result.speed.precision == precision
    weights = saved(tmp_path)
    assert weights and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in weights.values())


def test_fp16_with_accumulation_skips_no_step_for_a_non_finite_loss(processed, tmp_path):  # noqa: F811
    """The GradScaler may skip the first steps while it finds its scale (overflow steps); no step
    is skipped for a non-finite loss or gradient."""
    result = train(cuda_config(tmp_path, precision="fp16", accumulate_steps=2), processed, Recorder())
    learned(result)
    assert result.state.skipped_steps == 0


def test_the_compiled_forward_runs_on_cuda_without_a_fallback(processed, tmp_path):  # noqa: F811
    tracker = Recorder()
    result = train(cuda_config(tmp_path, precision="bf16", compile="default"), processed, tracker)
    learned(result)
    assert result.compiled is not None and result.compiled.compiled, result.compiled
    assert "compile_fallback" not in tracker.tags
    assert tracker.metrics["train/compile_s"][0][1] > 0


def test_the_dataloader_streams_page_locked_batches_to_cuda(processed, tmp_path):  # noqa: F811
    tracker = Recorder()
    result = train(cuda_config(tmp_path, loader="dataloader", num_workers=2, pin_memory=True), processed, tracker)
    learned(result)
    assert tracker.tags["loader"] == "dataloader"


def test_optimize_auto_measures_on_the_gpu_and_records_its_choice(processed, tmp_path):  # noqa: F811
    tracker = Recorder()
    result = train(cuda_config(tmp_path, optimize="auto", precision=None, compile=None), processed, tracker)
    learned(result)
    assert result.speed.precision in ("fp32", "bf16", "fp16")
    assert any(key.startswith("autotune") for key in tracker.tags), sorted(tracker.tags)


def test_an_interrupted_cuda_run_resumes_to_the_same_weights(processed, tmp_path):  # noqa: F811
    """Dropout draws from the CUDA generator: the checkpoint's CUDA RNG state makes the resumed run
    draw what the straight one drew."""
    def ckpt(where):
        return CheckpointContext(CheckpointConfig(dir=str(where / "ckpt"), every_steps=5, monitor=()), "f" * 16)

    def cfg(where):
        return cuda_config(where, dropout=0.2, hidden_sizes=[32, 16])

    straight = tmp_path / "straight"
    train(cfg(straight), processed, Recorder(), checkpoints=ckpt(straight))
    where = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        train(cfg(where), processed, Recorder(), hooks=[CrashAt(16 * 2 + 7)], checkpoints=ckpt(where))
    resumed = train(cfg(where), processed, Recorder(), checkpoints=ckpt(where))
    assert resumed.resumed_from is not None
    assert equal(saved(where), saved(straight))


@pytest.fixture(scope="module")
def nccl_group(tmp_path_factory):
    """An NCCL process group of this process alone, on CUDA device 0."""
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    torch.cuda.set_device(CUDA)
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=CUDA)
    yield RankSync(0, 1, CUDA)
    dist.destroy_process_group()


def test_the_loops_collectives_run_on_nccl(nccl_group):
    sync = nccl_group
    assert torch.equal(sync.sum(torch.tensor([1.5, 2.0], device=CUDA)).cpu(), torch.tensor([1.5, 2.0]))
    assert sync.any(True) and not sync.any(False)
    flags = torch.tensor([True, False], device=CUDA)
    assert torch.equal(all_ranks_true(flags).cpu(), torch.tensor([True, False]))
    digest = weights_digest(nn.Linear(2, 2).to(CUDA))
    assert gather_digests(sync, digest) == [digest]


def test_ddp_on_nccl_syncs_once_per_accumulated_step_and_matches_the_plain_step(nccl_group):
    ddp_syncs_once_per_accumulated_step(CUDA)
