"""train: the PyTorch loop inside an MLflow run that records params, code, data, machine and
console, with tiered checkpoints and the training observers (histograms, anomalies, progress).

With ``train.distributed.nproc_per_node`` above 1 the stage launches that many ranks of itself
under torchrun (:mod:`ml.train.distributed`); rank 0 alone holds the MLflow run and writes the
model and the run file, which the launching process returns as the stage's summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from ml.config import flatten, load_params
from ml.errors import ConfigError, cli_errors
from ml.data.prepare import Schema
from ml.io import atomic_write_json
from ml.provenance import dataset_version, git_diff, git_info
from ml.settings import autotune_cache_dir, load_settings
from ml.observe.observers import Observers
from ml.train.autotune import Decision
from ml.train.distributed import (check_nproc, launch, launched_rank, process_group, rank0_json, rank_slots,
                                  resolve_backend)
from ml.train.loop import resolve_device
from ml.train.speed import SpeedSettings
from ml.train.stage import CheckpointContext, config_fingerprint, run_name, train, tune_speed
from tasks.entry import PARENT_RUN_ENV, parent_run_id as inherited_parent_run_id, stage_main, stage_run

FLAGS = {"--fresh": "ignore training checkpoints and start from scratch",
         "--retune": "train.optimize auto: measure the candidate setups again instead of reusing the cached choice"}


def run(params_path: str = "params.yaml", fresh: bool = False, parent_run_id: str | None = None,
        retune: bool = False) -> dict[str, Any]:
    """Trains, resuming from the newest valid checkpoint of the same configuration unless ``fresh``;
    ``train.optimize: auto`` reuses the choice cached in the checkpoint directory unless ``retune``."""
    params, settings = load_params(params_path), load_settings()
    cfg, processed = params.train, params.data.processed_dir
    schema = Schema.read(processed)
    rank = launched_rank()
    if rank is None and cfg.distributed.nproc_per_node > 1:
        return _launch_ranks(params_path, params, parent_run_id, fresh=fresh, retune=retune)
    dataset = dataset_version(processed, schema.source)
    git = git_info()
    speed, decision = (tune_speed(cfg, processed, cache_dir=autotune_cache_dir(settings.checkpoint),
                                  retune=retune)
                       if rank is None or rank.rank == 0 else (None, None))
    if rank is not None:  # measurements differ between processes: every rank takes rank 0's choice
        speed, decision = _rank0_speed(speed, decision)
    fingerprint = config_fingerprint(cfg, dataset.md5, speed)
    if rank is not None and rank.rank != 0:  # trains with rank 0, which alone tracks and writes
        train(cfg, processed, checkpoints=CheckpointContext(settings.checkpoint, fingerprint, dataset=dataset.to_dict(),
                                                            git_commit=git.commit, fresh=fresh),
              autotuned=decision)
        return {}
    tags = {"git_commit": git.commit, "git_branch": git.branch, "git_dirty": git.dirty,
            "dataset_md5": dataset.md5, "dataset_source": dataset.source, "config_fingerprint": fingerprint}
    with stage_run("train", tracking=settings.tracking, run_name=run_name(cfg), parent=parent_run_id, tags=tags,
                   system_metrics=True) as tracker:
        tracker.log_params({**flatten(cfg, "train."), **flatten(params.anomaly, "anomaly."),
                            **flatten(settings.tracking, "settings.tracking."),
                            **flatten(settings.checkpoint, "settings.checkpoint."), "data.processed_dir": processed})
        tracker.log_dataset(pd.read_parquet(Path(processed) / "train.parquet"), dataset, "training")
        if git.dirty:
            tracker.log_text(git_diff(), "git/diff.patch")
        if Path(params.validate.report).is_file():
            tracker.log_artifact(params.validate.report, "data")
        checkpoints = CheckpointContext(settings.checkpoint, fingerprint, run_id=tracker.run_id,
                                        dataset=dataset.to_dict(), git_commit=git.commit, fresh=fresh)
        observers = Observers(params, tracker, schema, settings.tracking)
        try:
            result = train(cfg, processed, tracker, checkpoints=checkpoints, hook_factory=observers.hooks,
                           autotuned=decision)
        finally:
            observers.close()
        if result.resumed_from:
            tracker.set_tags({"resumed_from_checkpoint": result.resumed_from})
        if result.state.stop:
            tracker.set_tags({"stopped_early": result.state.stop_reason or "stopped by a hook"})
        example = pd.read_parquet(Path(processed) / "val.parquet").drop(columns=["label"]).head(5)
        model_uri = tracker.log_model(result.model, example.to_numpy(dtype="float32").copy())
        tracker.log_artifact(cfg.metrics_file, "metrics")
        observers.finish(result)
        summary = {"run_id": tracker.run_id, "model_uri": model_uri, "experiment": settings.tracking.experiment,
                   "run_url": tracker.url, "parent_run_id": parent_run_id, "dataset": dataset.to_dict(),
                   "git": {"commit": git.commit, "branch": git.branch, "dirty": git.dirty},
                   "resume": result.resume_note, "stopped_early": result.state.stop_reason,
                   "final": result.final_metrics, "restored_best_epoch": result.best_epoch,
                   "rollbacks": result.rollbacks}
        atomic_write_json(cfg.run_file, summary)
    return summary


def _launch_ranks(params_path: str, params: Any, parent_run_id: str | None, **flags: bool) -> dict[str, Any]:
    """Checks that the machine holds ``nproc_per_node`` ranks, runs them (``python -m tasks.train``
    under torchrun, each rank reading the same params, with the same ``flags``) and returns rank 0's
    summary."""
    cfg = params.train
    if params.anomaly.action == "rollback":  # a loss spike would roll rank 0 back alone
        raise ConfigError("anomaly.action: expected warn or stop when train.distributed.nproc_per_node is above 1 "
                          "(rank 0 alone watches the loss), got 'rollback'")
    device = resolve_device(cfg.device)
    nproc, backend = cfg.distributed.nproc_per_node, resolve_backend(cfg.distributed.backend, device)
    check_nproc(nproc, *rank_slots(backend, device))
    parent = inherited_parent_run_id(parent_run_id)
    launch(nproc, "tasks.train", ["--params", str(params_path), *(f"--{k}" for k, on in flags.items() if on)],
           env={PARENT_RUN_ENV: parent} if parent else None)
    return json.loads(Path(cfg.run_file).read_text())


def _rank0_speed(speed: SpeedSettings | None, decision: Decision | None) -> tuple[SpeedSettings, Decision | None]:
    """Rank 0's speed switches and autotune decision on every rank."""
    shared = rank0_json({"speed": asdict(speed), "decision": decision.model_dump(mode="json") if decision else None}
                        if speed is not None else None)
    return (SpeedSettings(**shared["speed"]),
            Decision.model_validate(shared["decision"]) if shared["decision"] is not None else None)


def rank_main(argv: list[str] | None = None) -> None:
    """One rank of a launched training: joins the process group and runs the stage. Nothing is
    printed as a summary: the launching process prints rank 0's."""
    parser = argparse.ArgumentParser(prog="python -m tasks.train", description="One rank of the train stage.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for flag, help_text in FLAGS.items():
        parser.add_argument(flag, action="store_true", help=help_text)
    args = parser.parse_args(argv)
    cli_errors(_run_rank)(args.params, **{flag.lstrip("-"): getattr(args, flag.lstrip("-")) for flag in FLAGS})


def _run_rank(params_path: str, **flags: bool) -> None:
    cfg, info = load_params(params_path).train, launched_rank()
    if info.local_world_size != cfg.distributed.nproc_per_node:
        raise ConfigError(f"train.distributed.nproc_per_node: expected {info.local_world_size} (the ranks torchrun "
                          f"started on this machine), got {cfg.distributed.nproc_per_node}")
    device = resolve_device(cfg.device)
    with contextlib.ExitStack() as stack:
        if info.rank:  # the other ranks print what rank 0 prints; errors and warnings (stderr) stay
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        stack.enter_context(process_group(resolve_backend(cfg.distributed.backend, device), info, device))
        run(params_path, **flags)


train_task = task(run, name="train", cache_policy=NO_CACHE)

if __name__ == "__main__":
    if launched_rank() is None:
        stage_main("train", run, flags=FLAGS)
    else:
        rank_main()
