"""train: builds the model from params, runs the loop with its hooks (checkpoints, milestones,
observers), writes the weights and the metric history."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ml.config import TrainConfig, flatten
from ml.data.prepare import Schema, load_split
from ml.io import atomic_write_json
from ml.settings import autotune_cache_dir
from ml.train.callbacks import EarlyStopping
from ml.train.divergence import TrainingDiverged
from ml.train.loop import Callback, LoopState, fit, record_stop, resolve_device, seed_everything
from ml.train.rollback import BestWeights, LossSpikeRollback, Rollbacks
from ml.train.checkpoints import CheckpointContext, CheckpointHook, MilestoneHook, open_checkpoints, resume_stage
from ml.model.architectures import Classifier, ModelSpec, build_model as build_architecture, image_shape
from ml.model.architectures import enable_activation_checkpointing, set_channels_last
from ml.model.serialization import save_model
from ml.tracking.base import NullTracker, Tracker
from ml.train.autotune import Candidate, Decision, Policy, preserved_rng, record_decision, tune
from ml.train.batches import (LoaderChoice, MemoryBatches, ParquetBatches, ParquetSplit, available_cores, choose_loader,
                              data_wait_advice)
from ml.train.memory import MemoryGuard
from ml.train.compile import CompiledForward, compile_forward, example_batches
from ml.train.distributed import gather_digests, interrupt_on_sigterm, rank_sync, seed_rank, weights_digest, wrap_model
from ml.train.speed import SpeedSettings, apply_backend_flags, autocast_for, grad_scaler_for, resolve_speed
from ml.train.schedule import build_scheduler, optimizer_steps

logger = logging.getLogger(__name__)

# TrainConfig keys that do not change what a step computes: a checkpoint made under other values
# of these still resumes exactly (more epochs extend a run; paths only say where results go).
_NOT_IN_FINGERPRINT = ("epochs", "device", "model_dir", "run_file", "metrics_file", "num_workers", "pin_memory",
                       "persistent_workers", "prefetch_factor")

class Splits(NamedTuple):
    """The training and validation arrays as train() loaded them, for hooks that need the data
    (with ``train.loader`` resolved to dataloader, ``x_train`` is the split's head and ``y_train`` every
    label)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


HookFactory = Callable[[Classifier, torch.optim.Optimizer, Splits], Sequence[Callback]]


@dataclass
class TrainResult:
    model: Classifier
    state: LoopState
    resumed_from: str | None = None
    resume_note: str = ""
    checkpoint_stats: list[dict[str, Any]] = field(default_factory=list)
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    compiled: CompiledForward | None = None
    best_epoch: int | None = None
    rollbacks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final_metrics(self) -> dict[str, float]:
        """The metrics of the weights the training ends with: the restored best epoch's
        (``train.restore_best``), else the last history entry's."""
        entries = [h for h in self.state.history if h["epoch"] == self.best_epoch] or self.state.history[-1:]
        return {k: v for k, v in entries[-1].items() if k not in ("epoch", "step")}


def run_name(cfg: TrainConfig) -> str:
    """A readable run name from the hyperparameters that most often differ between runs."""
    return f"train-lr{cfg.lr:g}-bs{cfg.batch_size}"


def build_model(cfg: TrainConfig, schema: Schema) -> Classifier:
    """The untrained network of ``train.model`` for the dataset's features and classes."""
    width = len(schema.features)
    shape = image_shape(width, cfg.input_shape) if cfg.input_shape or cfg.model in ("cnn", "vit") else ()
    return build_architecture(ModelSpec(width, cfg.hidden_sizes, schema.num_classes, cfg.dropout, cfg.model, shape,
                                        dict(cfg.model_kwargs), cfg.model_factory))


def config_fingerprint(cfg: TrainConfig, dataset_md5: str, speed: SpeedSettings | None = None) -> str:
    """Identifies "the same training": the hyperparameters that shape each step (the model, and the
    precision and compile mode as resolved for the device: ``speed``, which ``train.optimize: auto``
    needs, from :func:`tune_speed`), and the data."""
    keys = {k: v for k, v in flatten(cfg).items() if k not in _NOT_IN_FINGERPRINT}
    if speed is None and cfg.optimize == "auto":
        raise ValueError("config_fingerprint: train.optimize auto needs the tuned speed settings (tune_speed)")
    speed = asdict(speed or resolve_speed(cfg, resolve_device(cfg.device)))
    blob = json.dumps({"train": keys, "speed": speed, "dataset_md5": dataset_md5}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def autotune_speed(cfg: TrainConfig, model: Classifier, x_train: np.ndarray, y_train: np.ndarray,
                   device: torch.device, *, split: ParquetSplit | None = None, cache_dir: str | Path | None = None,
                   retune: bool = False, policy: Policy | None = None) -> Decision:
    """``train.optimize: auto``: the autotuner's decision (:mod:`ml.train.autotune`) for ``model``
    as built, on ``device``, before any speed switch converts it, probed on ``x_train``/``y_train``;
    the explicit keys pin theirs. With ``split`` (it does not fit memory and ``x_train``/``y_train``
    are its head), the dataloader with 0, 2 and 4 workers (at most the cores available) is measured
    too, under the setup chosen. A distributed run is not measured (each rank would time itself
    alone and could choose apart from the others): it trains as ``optimize: off`` with the explicit
    keys, and the decision says so."""
    base = resolve_speed(cfg, device)
    if cfg.distributed.nproc_per_node > 1:
        unmeasured = Candidate(precision=base.precision, compile=base.compile, memory_format=base.memory_format)
        return Decision(chosen=unmeasured, rows=(), job_steps=0, probe_s=0.0,
                        reason=f"a distributed run ({cfg.distributed.nproc_per_node} ranks) is not measured")
    loaders, dataloader = (), None
    if split is not None:
        loaders = tuple(sorted({min(w, available_cores()) for w in (0, 2, 4)}))
        dataloader = lambda workers: ParquetBatches(  # noqa: E731 - its own generator: no global RNG drawn
            split, cfg.batch_size, torch.Generator().manual_seed(cfg.seed), device=device, num_workers=workers,
            pin_memory=cfg.pin_memory, prefetch_factor=cfg.prefetch_factor)
    return tune(model, lambda params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
                (torch.from_numpy(x_train).to(device), torch.from_numpy(y_train).to(device)),
                batch_size=cfg.batch_size, accumulate_steps=cfg.accumulate_steps, loaders=loaders,
                dataloader=dataloader,
                job_steps=optimizer_steps(split.rows if split is not None else len(y_train), cfg.batch_size,
                                          cfg.accumulate_steps, cfg.epochs),
                device=device, pinned={"precision": cfg.precision, "compile": cfg.compile,
                                       "memory_format": cfg.memory_format},
                activation_checkpointing=base.activation_checkpointing, cache_dir=cache_dir, retune=retune,
                policy=policy or Policy())


def tune_speed(cfg: TrainConfig, processed_dir: str | Path, *, cache_dir: str | Path | None = None,
               retune: bool = False, policy: Policy | None = None) -> tuple[SpeedSettings, Decision | None]:
    """The run's speed switches before it starts (its configuration fingerprint needs them): those
    of :func:`ml.train.speed.resolve_speed`, and under ``optimize: auto`` the autotuner's choice for
    the model :func:`train` builds (built here the same way), every RNG state left as it was."""
    device = resolve_device(cfg.device)
    base = resolve_speed(cfg, device)
    if cfg.optimize != "auto":
        return base, None
    with preserved_rng():
        seed_everything(cfg.seed)
        schema = Schema.read(processed_dir)
        split = ParquetSplit(Path(processed_dir) / "train.parquet", schema.features, schema.classes)
        in_memory = choose_loader(cfg.loader, split.nbytes, cfg.memory_budget, device).name == "memory"
        x_train, y_train = (load_split(processed_dir, "train") if in_memory
                            else split.head(16 * cfg.batch_size * cfg.accumulate_steps))
        model = build_model(cfg, schema)
        model.set_input_stats(x_train if in_memory else split.stats_rows())
        model.to(device)
        decision = autotune_speed(cfg, model, x_train, y_train, device, split=None if in_memory else split,
                                  cache_dir=cache_dir, retune=retune, policy=policy)
    return decision.settings(base), decision


def environment() -> dict[str, str]:
    return {"torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def train(cfg: TrainConfig, processed_dir: str | Path, tracker: Tracker | None = None,
          hooks: Sequence[Callback] = (), *, checkpoints: CheckpointContext | None = None,
          hook_factory: HookFactory | None = None, autotuned: Decision | None = None,
          autotune_policy: Policy | None = None) -> TrainResult:
    """The train stage: seeded from params, so the same params and data give the same weights,
    whether the run went straight through or resumed from a checkpoint.

    With ``checkpoints``, training checkpoints are saved every ``every_steps``/``every_seconds`` and
    after every epoch, milestones when a monitored metric improves, and the newest valid training
    checkpoint of the same configuration is resumed (unless ``fresh``). ``hook_factory`` builds
    further hooks that need the model, optimizer or data (histograms, anomaly monitor, progress bar).
    ``train.early_stopping_patience`` adds :class:`ml.train.callbacks.EarlyStopping`. The state of
    every hook that has some (``state_key``) is saved in each checkpoint and restored on resume.

    A divergence (:class:`ml.train.divergence.TrainingDiverged`, or a loss spike under
    ``anomaly.action: rollback``) rolls training back to the newest checkpoint before it, past the
    batches read since, at most ``train.max_rollbacks`` times (:mod:`ml.train.rollback`); with
    ``train.restore_best`` the best epoch's weights are the ones saved and returned
    (:attr:`TrainResult.best_epoch`).

    The speed switches (``train.optimize`` and the keys that override it, see
    :mod:`ml.train.speed`) are logged as ``speed.*`` params; with ``train.compile``, the compile time
    is logged as ``train/compile_s`` and a compile that fails leaves training eager, with the reason
    in the run tag ``compile_fallback`` and on the console. Checkpoints and the saved model always
    hold the plain module's weights.

    ``train.optimize: auto`` takes ``autotuned`` (from :func:`tune_speed`), or measures on the model
    as built (``autotune_policy``; cached in the checkpoint directory), before any switch converts
    it: the decision is recorded (:func:`ml.train.autotune.record_decision`) and the run is the one
    its choice written by hand gives, bit for bit.
    """
    tracker = tracker or NullTracker()
    device = resolve_device(cfg.device)
    generator = seed_everything(cfg.seed)
    schema = Schema.read(processed_dir)
    train_split = ParquetSplit(Path(processed_dir) / "train.parquet", schema.features, schema.classes)
    loader = choose_loader(cfg.loader, train_split.nbytes, cfg.memory_budget, device)
    # the dataloader never holds the split: its head serves what needs rows at hand (compile shapes,
    # autotune), as many rows past whole batches as the split has, so its last batch has the split's shape
    x_train, y_train = (load_split(processed_dir, "train") if loader.name == "memory"
                        else train_split.head(16 * cfg.batch_size * cfg.accumulate_steps
                                              + train_split.rows % cfg.batch_size))
    x_val, y_val = load_split(processed_dir, "val")
    speed = resolve_speed(cfg, device)
    apply_backend_flags(speed)
    model = build_model(cfg, schema)
    model.set_input_stats(x_train if loader.name == "memory" else train_split.stats_rows())
    model.to(device)
    sync = rank_sync()  # under torchrun: this rank's place; the model is built alike on every rank
    rank, world = (sync.rank, sync.world_size) if sync is not None else (0, 1)
    seed_rank(cfg.seed, rank)
    workers = cfg.num_workers
    if cfg.optimize == "auto":
        decision = autotuned or autotune_speed(cfg, model, x_train, y_train, device, policy=autotune_policy,
                                               split=train_split if loader.name == "dataloader" else None,
                                               cache_dir=autotune_cache_dir(checkpoints.cfg) if checkpoints is not None else None)
        record_decision(tracker, decision)
        if decision.chosen.workers is not None:
            workers = decision.chosen.workers
        speed = decision.settings(speed)
    if speed.memory_format == "channels_last":
        set_channels_last(model)
    if speed.activation_checkpointing:
        enable_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  **({"fused": True} if speed.fused_optimizer else {}))
    autocast, scaler = autocast_for(speed.precision, device), grad_scaler_for(speed.precision, device)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.warmup_steps,
                                optimizer_steps(train_split.rows, cfg.batch_size, cfg.accumulate_steps, cfg.epochs))
    tracker.log_params(speed.as_params())
    as_tensors = lambda x, y: (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))  # noqa: E731
    all_hooks = list(hooks)
    result_stats: list[dict[str, Any]] = []
    manager, state, resumed_from, note, saved_callbacks = None, None, None, "", {}
    if checkpoints is not None:
        manager = open_checkpoints(checkpoints.cfg, on_saved=lambda s: _record_save(tracker, result_stats, s))
        resumed = resume_stage(manager, checkpoints, cfg.epochs, model, optimizer, generator, scaler=scaler,
                               scheduler=scheduler)
        state, resumed_from, note, saved_callbacks = resumed.state, resumed.name, resumed.note, resumed.callbacks
        logger.info("train: %s", note)
        if rank == 0:
            print(f"train: {note}", flush=True)
    if hook_factory is not None:
        labels = y_train if loader.name == "memory" else train_split.labels()
        all_hooks.extend(hook_factory(model, optimizer, Splits(x_train, labels, x_val, y_val)))
    if cfg.early_stopping_patience is not None:
        all_hooks.append(EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_metric))
    best = None
    if cfg.restore_best is not None:
        best = BestWeights(model, *cfg.restore_best.split(":"))
        all_hooks.append(best)
    rollbacks = Rollbacks(manager, cfg.max_rollbacks, checkpoints.fingerprint if checkpoints else None, model=model,
                          optimizer=optimizer, generator=generator, scheduler=scheduler, scaler=scaler, tracker=tracker)
    all_hooks.append(rollbacks)  # for its state: the rollbacks so far count over a resume too
    guard = None
    if cfg.memory.check_every_steps is not None:
        guard = MemoryGuard(cfg.memory.check_every_steps, cfg.memory.soft_limit, cfg.memory.hard_limit, device=device,
                            tracker=tracker)
        all_hooks.append(guard)
    states = callback_states(all_hooks)
    if state is not None:
        restore_callbacks(all_hooks, saved_callbacks)
    checkpoint_hook = None
    if checkpoints is not None:
        extra = {"fingerprint": checkpoints.fingerprint, "run_id": checkpoints.run_id,
                 "model_spec": model.spec.to_json(),
                 "classes": list(schema.classes), "features": list(schema.features),
                 "config": flatten(cfg, "train."), "dataset": dict(checkpoints.dataset),
                 "git_commit": checkpoints.git_commit, "environment": environment()}
        # after the callbacks whose state they save, so a checkpoint holds their state at its step
        checkpoint_hook = CheckpointHook(manager, model, optimizer, generator=generator, scaler=scaler,
                                         scheduler=scheduler,
                                         every_steps=checkpoints.cfg.every_steps,
                                         every_seconds=checkpoints.cfg.every_seconds, extra=lambda: extra,
                                         callback_states=states)
        all_hooks.append(checkpoint_hook)
        if checkpoints.cfg.monitor:
            all_hooks.append(MilestoneHook(manager, model, optimizer, generator, checkpoints.cfg.monitor, extra,
                                           checkpoints.run_id, callback_states=states, scheduler=scheduler,
                                           scaler=scaler))
    compiled = compile_forward(wrap_model(model, device) if sync is not None else model, speed.compile,
                               example_batches(*as_tensors(x_train, y_train), cfg.batch_size), autocast)
    # distributed: each rank trains on its shard of every epoch and validates on its share of val
    train_data = (MemoryBatches(*as_tensors(x_train, y_train), cfg.batch_size, generator, rank=rank, world_size=world)
                  if loader.name == "memory" else
                  ParquetBatches(train_split, cfg.batch_size, generator, device=device, rank=rank, world_size=world,
                                 num_workers=workers, pin_memory=cfg.pin_memory,
                                 persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch_factor))
    _record_loader(tracker, loader, rank)
    val_data = as_tensors(np.ascontiguousarray(x_val[rank::world]), np.ascontiguousarray(y_val[rank::world]))
    _record_compile(tracker, compiled)
    state = state or LoopState()
    interrupt_on_sigterm(sync is not None)  # torchrun stopping the ranks ends training, not the cleanup
    try:
        while True:
            try:
                state = fit(compiled.forward, optimizer, train_data, val_data,
                            epochs=cfg.epochs, tracker=tracker,
                            hooks=all_hooks, state=state, log_every_steps=cfg.log_every_steps, autocast=autocast,
                            scaler=scaler, eval_model=model, accumulate_steps=cfg.accumulate_steps,
                            clip_grad_norm=cfg.clip_grad_norm, scheduler=scheduler,
                            max_skipped_steps=cfg.max_skipped_steps, sync=sync, memory_guard=guard)
                break
            except (TrainingDiverged, LossSpikeRollback) as signal:
                # fit left `state` where the divergence was noticed: the rollback restores the
                # checkpoint before it and continues from there, past the batches in between
                state, saved_callbacks = rollbacks.recover(signal, state, len(train_data))
                restore_callbacks(all_hooks, saved_callbacks)
                if checkpoint_hook is not None:
                    checkpoint_hook.save_now(state)
    finally:
        interrupt_on_sigterm(False)
        if manager is not None:
            manager.close()
    if state.stop:
        record_stop(model, state, train_data, val_data, cfg.batch_size, tracker, autocast=autocast, sync=sync)
    best_epoch = _restore_best(best, state, tracker)
    _advise_data_wait(tracker, state, train_data, rank)
    if sync is not None:
        _check_replicas(sync, model, tracker)
    model.cpu().eval()
    if rank == 0:
        save_model(model, cfg.model_dir)
        atomic_write_json(cfg.metrics_file, state.history)
    return TrainResult(model, state, resumed_from, note, result_stats, speed, compiled, best_epoch,
                       rollbacks.as_dicts())


def _record_loader(tracker: Tracker, loader: LoaderChoice, rank: int) -> None:
    """Where batches come from (``train.loader``) and why: the run tag ``loader`` and one console line."""
    tracker.set_tags({"loader": loader.name, "loader.reason": loader.reason})
    logger.info("train: batches from %s: %s", loader.name, loader.reason)
    if rank == 0:
        print(f"train: batches from {loader.name}: {loader.reason}", flush=True)


def _advise_data_wait(tracker: Tracker, state: LoopState, source: Any, rank: int) -> None:
    """When the loop waited for batches too long, one console line (and the run tag ``data_bound``)
    naming the setting to change."""
    advice = data_wait_advice(state.timing.summary().get("data_wait_fraction"), source)
    if advice is None:
        return
    tracker.set_tags({"data_bound": advice})
    logger.warning("train: %s", advice)
    if rank == 0:
        print(f"train: {advice}", flush=True)


def _restore_best(best: BestWeights | None, state: LoopState, tracker: Tracker) -> int | None:
    """Loads the best epoch's weights (``train.restore_best``) and records which epoch they are
    from: run tags ``restore_best.epoch`` and ``restore_best.value``, and one console line."""
    epoch = best.restore() if best is not None else None
    if epoch is None:
        return None
    tracker.set_tags({"restore_best.epoch": epoch, "restore_best.value": f"{best.metric} {best.best:.6g}"})
    line = (f"train: the weights of epoch {epoch} are kept ({best.metric} {best.best:.6g}, the best of "
            f"{len([h for h in state.history if float(h['epoch']).is_integer()])} epochs)")
    logger.info("%s", line)
    print(line, flush=True)
    return epoch


def _check_replicas(sync: Any, model: Classifier, tracker: Tracker) -> None:
    """Every rank ends with the same weights (DDP keeps them so): their digests, in rank order, as
    the run tag ``ddp.weights_digests`` beside ``ddp.world_size``; replicas that differ are a bug
    and end the run before any model is written."""
    digests = gather_digests(sync, weights_digest(model))
    tracker.set_tags({"ddp.world_size": sync.world_size, "ddp.weights_digests": ",".join(digests)})
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP replicas diverged: weight digests by rank {digests}")


def _record_compile(tracker: Tracker, compiled: CompiledForward) -> None:
    """Compile time as a metric; a fallback to eager as a run tag and one console line."""
    if compiled.mode == "off":
        return
    tracker.log_metric("train/compile_s", compiled.seconds, 0)
    if compiled.fallback_reason is not None:
        tracker.set_tags({"compile_fallback": compiled.fallback_reason})
        logger.warning("train: compile %s failed, training eager: %s", compiled.mode, compiled.fallback_reason)
        print(f"train: compile {compiled.mode} failed, training eager: {compiled.fallback_reason}", flush=True)


def callback_states(hooks: Sequence[Callback]) -> Callable[[], dict[str, Any]]:
    """What a checkpoint stores of the hooks' state: ``{state_key: state_dict()}`` of every hook that
    has a ``state_key``, taken when called."""
    stateful = [h for h in hooks if h.state_key is not None]
    keys = [h.state_key for h in stateful]
    if len(set(keys)) != len(keys):
        raise ValueError(f"callbacks: state keys must be unique, got {keys}")
    return lambda: {h.state_key: h.state_dict() for h in stateful}


def restore_callbacks(hooks: Sequence[Callback], saved: Mapping[str, Any]) -> None:
    """Hands each stateful hook its state from a resumed checkpoint; a hook the checkpoint has no
    state for (it was not attached then) starts fresh."""
    for hook in hooks:
        if hook.state_key is not None and hook.state_key in saved:
            hook.load_state_dict(saved[hook.state_key])


def _record_save(tracker: Tracker, stats: list[dict[str, Any]], s: Any) -> None:
    """Every save reports its blocking and background time and bytes to the tracker."""
    stats.append({"tier": s.tier, "name": s.name, "step": s.step, "blocking_s": s.blocking_s,
                  "waited_s": s.waited_s, "background_s": s.background_s, "bytes_written": s.bytes_written})
    step = s.step or 0
    tracker.log_metric(f"checkpoint/{s.tier}_blocking_ms", 1000 * s.blocking_s, step)
    tracker.log_metric(f"checkpoint/{s.tier}_background_ms", 1000 * s.background_s, step)
    tracker.log_metric(f"checkpoint/{s.tier}_bytes", float(s.bytes_written), step)
