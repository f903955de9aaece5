"""Data-parallel training under ``torchrun``: ``train.distributed.nproc_per_node`` processes, each a
rank with its own shard of every epoch, the model wrapped in ``DistributedDataParallel``.

The train stage launches itself (:func:`launch`): ``python -m ml.train.distributed`` runs
``torch.distributed.run``'s own entry (``--standalone --nproc_per_node N -m tasks.train ...``) and
turns a failed rank into one line instead of torchrun's error report and traceback. Each rank then
finds itself in the environment torchrun sets (:func:`launched_rank`), joins the process group
(:func:`process_group`) and trains; rank 0 alone tracks, checkpoints (the checkpoint manager
gathers every rank's RNG and loop state into rank 0's checkpoint) and writes the model.

What keeps the ranks in step besides DDP's gradient all-reduce is :class:`RankSync`: the loop's
epoch sums and logged losses are reduced across ranks, and a stop any rank's hook asks for is
every rank's stop, so no rank waits in a collective the others never enter.

When one rank dies, the others' next collective fails, and torchrun stops them with SIGTERM, which
raises :class:`RankStopped` while the training loop runs (:func:`interrupt_on_sigterm`) and is
ignored during the cleanup after it: rank 0's MLflow run ends FAILED, no model is written, and the
newest committed checkpoint is where a rerun resumes.

The autotune choice (``train.optimize: auto``) is rank 0's, shared with :func:`rank0_json`:
measurements differ between processes, the switches every rank trains with must not.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ml.errors import ConfigError, PipelineError

__all__ = ["RankInfo", "RankStopped", "RankSync", "all_ranks_true", "check_nproc", "ddp_module", "gather_digests",
           "grad_sync", "interrupt_on_sigterm", "launch", "launch_command", "launched_rank", "lost_peer",
           "process_group", "rank0_json", "rank_slots", "rank_sync", "resolve_backend", "root_failure", "seed_rank",
           "weights_digest", "wrap_model"]

# The environment torchrun gives each rank.
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# Exit code of a rank stopped by SIGTERM (128 + the signal), told apart from the rank that failed first.
STOPPED_EXIT_CODE = 128 + signal.SIGTERM


class RankStopped(PipelineError):
    """This rank was told to stop (SIGTERM: torchrun stops every rank once one fails)."""

    exit_code = STOPPED_EXIT_CODE
    retryable = True


@dataclass(frozen=True)
class RankInfo:
    """This process's place among the ranks torchrun started."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def launched_rank(environ: Mapping[str, str] | None = None) -> RankInfo | None:
    """The rank torchrun made this process (from RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE),
    or None in a process torchrun did not start."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    return RankInfo(rank, world, int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world)))


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """``train.distributed.backend`` as the process group takes it: null is nccl on CUDA, gloo on the
    CPU; nccl needs CUDA."""
    if backend is None:
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"train.distributed.backend: expected gloo when training on the {device.type} "
                          "(nccl needs CUDA devices), got 'nccl'")
    return backend


def rank_slots(backend: str, device: torch.device) -> tuple[int, str]:
    """How many ranks this machine can hold, and what they are: one per CUDA device for a model
    on CUDA, else one per CPU core this process may run on."""
    if backend == "nccl" or device.type == "cuda":
        return torch.cuda.device_count(), "CUDA devices"
    from ml.train.batches import available_cores

    return available_cores(), "CPU cores available"


def check_nproc(nproc: int, slots: int, what: str) -> None:
    """One line, before any work starts, when more ranks are asked for than there are ``slots``."""
    if nproc > slots:
        raise ConfigError(f"train.distributed.nproc_per_node: expected at most {slots} (the {what} on this "
                          f"machine), got {nproc}")


def launch_command(nproc: int, module: str, args: Sequence[str], python: str = sys.executable) -> list[str]:
    """The command that starts ``nproc`` ranks of ``python -m module args`` on this machine."""
    return [python, "-m", "ml.train.distributed", "--standalone", "--nproc_per_node", str(nproc), "-m", module, *args]


def launch(nproc: int, module: str, args: Sequence[str], *, env: Mapping[str, str] | None = None,
           cwd: str | Path | None = None) -> None:
    """Runs ``nproc`` ranks of ``python -m module args`` and waits for them; their output goes to
    this process's. Raises a one-line :class:`PipelineError` naming the rank that failed first."""
    with tempfile.TemporaryDirectory(prefix="mlops-ddp-") as scratch:
        failure_file = Path(scratch) / "failure.txt"
        child_env = {**os.environ, **(env or {}), _FAILURE_ENV: str(failure_file)}
        done = subprocess.run(launch_command(nproc, module, args), env=child_env, cwd=cwd, check=False)
        if done.returncode == 0:
            return
        reason = failure_file.read_text().strip() if failure_file.is_file() else f"exit code {done.returncode}"
    error = PipelineError(f"train: distributed training failed: {reason}; a rerun resumes from the newest "
                          "valid checkpoint")
    error.retryable = True
    raise error


@contextmanager
def process_group(backend: str, info: RankInfo, device: torch.device) -> Iterator[None]:
    """Joins the process group torchrun's environment describes (CUDA: this rank's device by its
    local rank) and leaves it on exit. Within, SIGTERM ends training (:func:`interrupt_on_sigterm`),
    and a collective that lost another rank ends this one as :class:`RankStopped`."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    dist.init_process_group(backend)
    try:
        yield
    except RuntimeError as exc:
        if not lost_peer(exc):
            raise
        first = str(exc).strip().splitlines()[0]
        raise RankStopped(f"rank {info.rank}: stopped, another rank is gone ({first[:200]})") from None
    finally:
        dist.destroy_process_group()
        signal.signal(signal.SIGTERM, previous)


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank is gone (that rank's failure
    is the cause): torch's DistError, or the RuntimeError gloo's transport raises."""
    import torch.distributed as dist

    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo/transport" in str(exc))


_training = {"armed": False}


def interrupt_on_sigterm(armed: bool) -> None:
    """Arms (training runs) or disarms (training ended, cleanup runs) what SIGTERM does in a rank
    (see :func:`_on_sigterm`)."""
    _training["armed"] = armed


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM raises :class:`RankStopped` while training runs; once training has ended (or failed
    and is cleaning up: closing the MLflow run, the checkpoint writer) the signal is ignored, so
    the cleanup finishes."""
    if _training["armed"]:
        _training["armed"] = False
        raise RankStopped(f"rank {os.environ.get('RANK', '?')}: stopped by SIGTERM (another rank failed)")


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (rank 0's weights and buffers go to every rank)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index if device.index is not None
                                                      else torch.cuda.current_device()]
                                   if device.type == "cuda" else None)


def ddp_module(model: nn.Module) -> nn.Module | None:
    """The DistributedDataParallel wrapper ``model`` is (compiled or not), or None."""
    from torch.nn.parallel import DistributedDataParallel

    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, DistributedDataParallel) else None


def grad_sync(model: nn.Module, last: bool) -> AbstractContextManager[Any]:
    """The context of one micro-batch's forward pass: under DDP, gradients are all-reduced only in
    the backward of the step's ``last`` micro-batch (``no_sync()`` for the others: DDP decides in
    the forward pass whether its backward synchronizes)."""
    ddp = ddp_module(model)
    return nullcontext() if last or ddp is None else ddp.no_sync()


def all_ranks_true(flags: torch.Tensor) -> torch.Tensor:
    """``flags`` (booleans) true where they are true on every rank."""
    import torch.distributed as dist

    agreed = flags.to(torch.int32)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return agreed.bool()


class RankSync:
    """This rank's place in the process group and the collectives the training loop needs to keep
    the ranks in step (every rank calls each one at the same point). ``device`` is where the
    tensors of collectives live (CUDA under nccl)."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over the ranks (a new tensor)."""
        import torch.distributed as dist

        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.sum(tensor) / self.world_size

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        return bool(self.sum(torch.tensor([int(flag)], dtype=torch.int32, device=self.device)).item())


def rank_sync() -> RankSync | None:
    """The :class:`RankSync` of an initialized process group of more than one rank, else None (one
    process: a tuning trial, a test, a run without torchrun)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return RankSync(dist.get_rank(), dist.get_world_size(), device)


def rank0_json(payload: Any) -> Any:
    """Rank 0's ``payload`` (JSON-able; what other ranks pass is ignored) on every rank."""
    from ml.checkpoint.distributed import broadcast_json, detect_distributed

    return broadcast_json(detect_distributed(True), payload)


def seed_rank(seed: int, rank: int) -> None:
    """Seeds python, numpy and torch with ``seed + rank``: each rank its own dropout and noise
    (rank 0 keeps the one-process stream; the shuffling generator stays the same on every rank)."""
    if rank:
        random.seed(seed + rank)
        np.random.seed(seed + rank)
        torch.manual_seed(seed + rank)


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over the state dict's names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def gather_digests(sync: RankSync, digest: str) -> list[str]:
    """Every rank's hex ``digest``, in rank order (a tensor collective: nothing is pickled)."""
    import torch.distributed as dist

    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=sync.device)
    every = [torch.empty_like(mine) for _ in range(sync.world_size)]
    dist.all_gather(every, mine)
    return [bytes(t.cpu().tolist()).hex() for t in every]


# -- the launcher process: torchrun's own entry, with a failed rank as one line ----------------------

_FAILURE_ENV = "MLOPS_DDP_FAILURE_FILE"


def root_failure(failures: Mapping[int, Any]) -> str:
    """The rank that failed first, as a phrase: ranks torchrun stopped because another failed
    (SIGTERM, :data:`STOPPED_EXIT_CODE`) are the root cause only when no other rank failed.
    ``failures`` maps a global rank to torchrun's ``ProcessFailure`` (``exitcode``, ``timestamp``,
    ``signal_name()``)."""
    stopped = (STOPPED_EXIT_CODE, -signal.SIGTERM)
    rank, failure = min(failures.items(), key=lambda item: (item[1].exitcode in stopped, item[1].timestamp, item[0]))
    if failure.exitcode < 0:
        return f"rank {rank} was killed by {failure.signal_name()}"
    return f"rank {rank} exited with code {failure.exitcode}"


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ChildFailedError as exc:
        reason = root_failure(exc.failures)
        failure_file = os.environ.get(_FAILURE_ENV)
        if failure_file:
            Path(failure_file).write_text(reason + "\n")
        else:
            print(f"error: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
