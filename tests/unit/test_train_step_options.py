"""Gradient accumulation, clipping, the learning-rate schedule and skipped steps: each in the real
loop, each resumed bit-identically from a checkpoint taken mid-epoch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ml.checkpoint.manager import CheckpointManager
from ml.config import TrainConfig, load_params
from ml.errors import ConfigError
from ml.model.architectures import MLP, ModelSpec
from ml.train.checkpoints import CheckpointHook, resume
from ml.train.divergence import TrainingDiverged
from ml.train.loop import Callback, LoopState, fit, seed_everything
from ml.train.schedule import build_scheduler, optimizer_steps
from ml.train.step import train_step


def data(n=200, features=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)) % 3
    return torch.from_numpy(x), torch.from_numpy(y)


class Recorder:
    """A Tracker that keeps the metrics it was given."""

    run_id = None

    def __init__(self):
        self.metrics: dict[str, list[tuple[int, float]]] = {}

    def log_metric(self, key, value, step):
        self.metrics.setdefault(key, []).append((step, value))

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.log_metric(key, value, step)

    def set_tags(self, tags):
        pass


class Interrupted(Exception):
    pass


class CrashAt(Callback):
    def __init__(self, manager, step):
        self.manager, self.step = manager, step

    def on_step_end(self, state, step):
        if state.global_step == self.step:
            self.manager.wait()
            raise Interrupted


EPOCHS, BATCH = 4, 16   # 200 samples: 13 batches an epoch


def run(root=None, *, crash_step=None, seed=3, accumulate_steps=1, clip_grad_norm=None, schedule="constant",
        warmup_steps=0, dropout=0.2, tracker=None):
    """One training; with ``root``, checkpoints every 2 optimizer steps and resumes from the newest."""
    generator = seed_everything(seed)
    model = MLP(ModelSpec(8, (16,), 3, dropout))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    total = optimizer_steps(200, BATCH, accumulate_steps, EPOCHS)
    scheduler = build_scheduler(optimizer, schedule, warmup_steps, total)
    kwargs = dict(epochs=EPOCHS, batch_size=BATCH, generator=generator, accumulate_steps=accumulate_steps,
                  clip_grad_norm=clip_grad_norm, scheduler=scheduler, tracker=tracker)
    if root is None:
        return fit(model, optimizer, data(), data(seed=1), **kwargs), model, scheduler
    with CheckpointManager(root) as manager:
        resumed = resume(manager, model, optimizer, generator=generator, scheduler=scheduler, epochs=EPOCHS)
        hooks = [CheckpointHook(manager, model, optimizer, generator=generator, scheduler=scheduler, every_steps=2,
                                at_epoch_end=False)]
        if crash_step is not None:
            hooks.append(CrashAt(manager, crash_step))
        state = fit(model, optimizer, data(), data(seed=1), hooks=hooks, state=resumed.state, **kwargs)
    return state, model, scheduler


# --- accumulation -------------------------------------------------------------------------------------

def test_accumulating_two_batches_is_one_step_over_both():
    """bs 16 x 2 micro-batches takes the same steps as bs 32 (the same permutation, grouped the same),
    up to float summation order; global_step counts optimizer steps."""
    accumulated, model_a, _ = run(accumulate_steps=2, dropout=0.0)
    BATCH_2 = 32
    generator = seed_everything(3)
    model_b = MLP(ModelSpec(8, (16,), 3, 0.0))
    optimizer = torch.optim.AdamW(model_b.parameters(), lr=0.02)
    plain = fit(model_b, optimizer, data(), data(seed=1), epochs=EPOCHS, batch_size=BATCH_2, generator=generator)
    assert accumulated.global_step == plain.global_step == EPOCHS * 7          # 13 batches: 6 pairs and a single
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [h["train_loss"] for h in accumulated.history] == pytest.approx([h["train_loss"] for h in plain.history],
                                                                          rel=1e-5)


def test_checkpoints_land_on_optimizer_step_boundaries(tmp_path):
    state, _, _ = run(tmp_path, accumulate_steps=3)
    with CheckpointManager(tmp_path) as manager:
        saved = [int(name.rsplit("-step-", 1)[1]) for name in manager.list("training")]
        loaded = manager.load_latest_valid("training")
    assert state.global_step == EPOCHS * 5                                      # 13 batches: 4 x 3 and 1
    assert saved and all(step % 2 == 0 for step in saved)
    batch = loaded.state["loop"]["batch_in_epoch"]
    assert batch % 3 == 0 or batch == 13


# --- clipping -----------------------------------------------------------------------------------------

def test_clipping_scales_the_update_to_the_limit_and_reports_the_norm_before():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = data(32)
    before = [p.detach().clone() for p in model.parameters()]
    out = train_step(model, optimizer, [(x * 100, y)], clip_grad_norm=0.5)
    applied = torch.linalg.vector_norm(torch.cat([(b - p.detach()).flatten()
                                                  for b, p in zip(before, model.parameters())]))
    assert out.grad_norm.item() > 5.0                                           # the norm before clipping
    assert applied.item() == pytest.approx(0.5, rel=1e-5)                       # lr 1: the update is the gradient


def test_clipping_under_the_limit_changes_nothing():
    results = []
    for clip in (None, 1e6):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 3)
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), [data(32)], clip_grad_norm=clip)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


# --- schedule -----------------------------------------------------------------------------------------

def lrs(schedule, warmup, total, lr=1.0):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(optimizer, schedule, warmup, total)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedules():
    assert lrs("constant", 0, 5) == [1.0] * 5
    assert lrs("constant", 3, 6) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    cosine = lrs("cosine", 2, 10)
    assert cosine[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert cosine[2:] == sorted(cosine[2:], reverse=True) and cosine[-1] == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 7 / 8)))
    onecycle = lrs("onecycle", 4, 20, lr=0.1)
    peak = onecycle.index(max(onecycle))
    assert peak == 4 and max(onecycle) == pytest.approx(0.1) and onecycle[0] < 0.01 and onecycle[-1] < 1e-4


def test_the_loop_logs_the_rate_each_step_used():
    tracker = Recorder()
    state, _, _ = run(schedule="cosine", warmup_steps=5, tracker=tracker)
    logged = [value for _, value in tracker.metrics["train/lr"]]
    assert len(logged) == state.global_step == EPOCHS * 13
    assert logged[:6] == pytest.approx([0.02 * k / 6 for k in range(1, 7)])
    assert logged[5] == max(logged) and logged[-1] < 0.001


@pytest.mark.parametrize("warmup, message", [
    (52, "train.warmup_steps: expected fewer than the run's 52 optimizer steps (epochs x ceil(batches per epoch / "
         "accumulate_steps)), got 52"),
    (500, "train.warmup_steps: expected fewer than the run's 52 optimizer steps (epochs x ceil(batches per epoch / "
          "accumulate_steps)), got 500"),
])
def test_a_warmup_longer_than_the_run_is_one_line(warmup, message):
    with pytest.raises(ConfigError) as info:
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "cosine", warmup,
                        optimizer_steps(200, BATCH, 1, EPOCHS))
    assert str(info.value) == message


def test_accumulate_steps_zero_is_refused_by_the_params():
    raw = load_params().train.model_dump()
    with pytest.raises(Exception) as info:
        TrainConfig(**{**raw, "accumulate_steps": 0})
    assert "accumulate_steps" in str(info.value) and "greater than 0" in str(info.value)
    with pytest.raises(ValueError, match=r"^accumulate_steps: expected an integer >= 1, got 0$"):
        fit(torch.nn.Linear(8, 3), torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), data(), data(),
            epochs=1, batch_size=16, generator=torch.Generator(), accumulate_steps=0)


# --- exact resume -------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(accumulate_steps=3),
    dict(clip_grad_norm=0.05),
    dict(schedule="cosine", warmup_steps=7),
    dict(schedule="onecycle", warmup_steps=7, accumulate_steps=2, clip_grad_norm=0.5),
], ids=["accumulation", "clipping", "cosine-warmup", "onecycle-all"])
def test_a_run_interrupted_mid_epoch_resumes_bit_identically(tmp_path, options):
    straight, straight_model, straight_scheduler = run(tmp_path / "straight", **options)
    per_epoch = straight.global_step // EPOCHS
    crash = per_epoch + per_epoch // 2 + 1       # mid-epoch 2; the newest checkpoint is the step before (every 2)
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", crash_step=crash, **options)
    resumed, resumed_model, resumed_scheduler = run(tmp_path / "resumed", seed=99, **options)
    assert resumed.global_step == straight.global_step and resumed.history == straight.history
    assert resumed_scheduler.state_dict() == straight_scheduler.state_dict()
    straight_weights, resumed_weights = straight_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights)


def test_a_training_checkpoint_holds_the_scheduler_at_its_step(tmp_path):
    options = dict(schedule="cosine", warmup_steps=7)
    straight, straight_model, _ = run(tmp_path / "straight", **options)
    crash = straight.global_step // 2 + 1
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", crash_step=crash, **options)
    with CheckpointManager(tmp_path / "resumed") as manager:
        loaded = manager.load_latest_valid("training")
    assert loaded.state["scheduler"]["last_epoch"] == loaded.state["loop"]["global_step"]


# --- skipped steps ------------------------------------------------------------------------------------

def poisoned(step_batches, n=200):
    """The training data with NaN features in every row of the given batches of the first epoch's
    permutation (seed 3, batch 16)."""
    x, y = data(n)
    generator = seed_everything(3)
    MLP(ModelSpec(8, (16,), 3, 0.2))     # the same draws as run() before the permutation
    order = torch.randperm(n, generator=generator)
    x = x.clone()
    for b in step_batches:
        x[order[b * BATCH:(b + 1) * BATCH]] = math.nan
    return x, y


def test_a_poisoned_batch_is_skipped_and_training_goes_on():
    x, y = poisoned([4])
    generator = seed_everything(3)
    model = MLP(ModelSpec(8, (16,), 3, 0.2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)

    class Watch(Callback):
        def __init__(self):
            self.weights, self.skipped = {}, []

        def on_step_end(self, state, step):
            self.weights[state.global_step] = [p.detach().clone() for p in model.parameters()]
            if step.skipped:
                self.skipped.append(state.global_step)

    watch, tracker = Watch(), Recorder()
    state = fit(model, optimizer, (x, y), data(seed=1), epochs=1, batch_size=BATCH, generator=generator,
                hooks=[watch], tracker=tracker, max_skipped_steps=3)
    assert watch.skipped == [5] and state.skipped_steps == 1 and state.consecutive_skips == 0
    assert all(torch.equal(a, b) for a, b in zip(watch.weights[4], watch.weights[5]))        # no update at 5
    assert not all(torch.equal(a, b) for a, b in zip(watch.weights[5], watch.weights[6]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert tracker.metrics["train/skipped_steps"] == [(5, 1.0)]
    assert math.isfinite(state.history[0]["train_loss"])          # the skipped step is not in the running mean


def test_max_skipped_steps_in_a_row_end_training_with_one_line():
    x, y = poisoned([2, 3, 4])
    generator = seed_everything(3)
    model = MLP(ModelSpec(8, (16,), 3, 0.2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    with pytest.raises(TrainingDiverged) as info:
        fit(model, optimizer, (x, y), data(seed=1), epochs=1, batch_size=BATCH, generator=generator,
            max_skipped_steps=3)
    assert str(info.value).startswith("training diverged: 3 steps in a row up to step 5 had a non-finite loss")
    assert "\n" not in str(info.value)


def test_skip_counts_survive_a_resume():
    state = LoopState(skipped_steps=4, consecutive_skips=2, overflow_steps=7)
    back = LoopState()
    back.load_state_dict(state.state_dict())
    assert (back.skipped_steps, back.consecutive_skips, back.overflow_steps) == (4, 2, 7)


def test_a_gradscaler_overflow_is_counted_apart_and_not_a_divergence():
    """GradScaler on the CPU (the same bookkeeping as on CUDA): a scale that overflows the gradients
    under a finite loss is an overflow step the scaler skips and halves its scale for, not a skip."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    x, y = data(16)
    before = [p.detach().clone() for p in model.parameters()]
    out = train_step(model, optimizer, [(x * 1e3, y)], scaler=scaler)
    assert out.overflow and not out.skipped and math.isfinite(out.loss.item())
    assert scaler.get_scale() == 2.0 ** 126
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    state, tracker = LoopState(global_step=1), Recorder()
    from ml.train.loop import _count_skips

    _count_skips(state, out, tracker, max_skipped_steps=1)
    assert (state.overflow_steps, state.skipped_steps) == (1, 0)
    assert tracker.metrics == {"train/overflow_steps": [(1, 1.0)]}
