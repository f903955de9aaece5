"""train.restore_best: the best epoch's weights are the ones the stage saves, whether it went
straight through or resumed; milestones carry the scheduler state; bad values are one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ml.checkpoint.manager import CheckpointManager
from ml.config import load_params
from ml.errors import ConfigError
from ml.settings import CheckpointConfig
from ml.train.checkpoints import CheckpointContext
from ml.train.loop import Callback, LoopState
from ml.train.rollback import BestWeights
from ml.train.stage import train
from tests.conftest import small_params, write_params
from tests.unit.test_rollback import Recorder, processed, train_config  # noqa: F401 - processed is a fixture


class WeightsPerEpoch(Callback):
    """Keeps a copy of the weights at every epoch's end; zeroes them after the first step past
    ``wreck_after`` epochs, so that the epochs after it end worse than the best one."""

    def __init__(self, model, wreck_after=None):
        self.model, self.wreck_after = model, wreck_after
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, state, step):
        if state.epoch == self.wreck_after and state.batch_in_epoch == 1:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(0.0)

    def on_epoch_end(self, state, metrics):
        self.weights[state.epoch] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def saved(tmp_path):
    return load_file(str(tmp_path / "model" / "model.safetensors"))


def equal(a, b):
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_the_best_epoch_by_val_loss_is_saved_and_recorded(processed, tmp_path, capsys):  # noqa: F811
    tracker, seen = Recorder(), []

    def hooks(model, optimizer, splits):
        seen.append(WeightsPerEpoch(model, wreck_after=3))
        return seen

    result = train(train_config(tmp_path, epochs=4, lr=0.003, restore_best="val_loss:min"), processed, tracker,
                   hook_factory=hooks)
    history = result.state.history
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    assert best != history[-1]["epoch"]   # the wrecked last epoch ends worse
    assert result.best_epoch == best and equal(saved(tmp_path), seen[0].weights[best])
    assert result.final_metrics["val_loss"] == history[best - 1]["val_loss"]
    assert tracker.tags["restore_best.epoch"] == best
    assert tracker.tags["restore_best.value"] == f"val_loss {history[best - 1]['val_loss']:.6g}"
    assert f"train: the weights of epoch {best} are kept" in capsys.readouterr().out


def test_restore_best_null_keeps_the_last_epoch(processed, tmp_path):  # noqa: F811
    seen = []

    def hooks(model, optimizer, splits):
        seen.append(WeightsPerEpoch(model, wreck_after=3))
        return seen

    result = train(train_config(tmp_path, epochs=4, lr=0.003), processed, Recorder(), hook_factory=hooks)
    assert result.best_epoch is None and equal(saved(tmp_path), seen[0].weights[4])


class Interrupted(Exception):
    pass


class CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, step):
        if state.global_step == self.step:
            raise Interrupted


def test_a_resumed_run_restores_the_same_best_epoch_as_a_straight_one(processed, tmp_path):  # noqa: F811
    """The best weights are in the training checkpoints: interrupted after the best epoch, the
    resumed run still ends with that epoch's weights."""
    def cfg(where):
        return train_config(where, epochs=4, lr=0.003, restore_best="val_loss:min")

    def ckpt(where):
        return CheckpointContext(CheckpointConfig(dir=str(where / "ckpt"), every_steps=5, monitor=()), "f" * 16)

    wreck = lambda model, optimizer, splits: [WeightsPerEpoch(model, wreck_after=3)]  # noqa: E731
    straight = train(cfg(tmp_path / "straight"), processed, Recorder(), checkpoints=ckpt(tmp_path / "straight"),
                     hook_factory=wreck)
    where = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        train(cfg(where), processed, Recorder(), hooks=[CrashAt(16 * 3 + 7)], checkpoints=ckpt(where),
              hook_factory=wreck)
    resumed = train(cfg(where), processed, Recorder(), checkpoints=ckpt(where), hook_factory=wreck)
    assert resumed.resumed_from is not None
    assert resumed.best_epoch == straight.best_epoch != 4
    assert equal(saved(where), saved(tmp_path / "straight"))


def test_milestones_carry_the_scheduler_state(processed, tmp_path):  # noqa: F811
    cfg = train_config(tmp_path, epochs=2, schedule="cosine", warmup_steps=3)
    ctx = CheckpointContext(CheckpointConfig(dir=str(tmp_path / "ckpt"), every_steps=None, monitor=("val_loss:min",)),
                            "f" * 16)
    train(cfg, processed, Recorder(), checkpoints=ctx)
    manager = CheckpointManager(tmp_path / "ckpt", read_only=True)
    name, _, _ = manager.best("val_loss")
    state = manager.load_checkpoint("milestone", name)
    loop = LoopState()
    loop.load_state_dict(state["loop"])
    assert state["scheduler"] is not None and state["scheduler"]["last_epoch"] == loop.global_step > 0
    assert state["scheduler"]["_step_count"] == loop.global_step + 1


def test_best_weights_keeps_a_copy_that_later_training_does_not_change():
    model = torch.nn.Linear(2, 2)
    hook = BestWeights(model, "val_loss", "min")
    state = LoopState()
    for epoch, loss in enumerate([1.0, 0.5, float("nan"), 0.7], start=1):
        state.epoch = epoch
        with torch.no_grad():
            model.weight.fill_(epoch)
        hook.on_epoch_end(state, {"val_loss": loss})
    assert hook.restore() == 2 and model.weight.eq(2).all()
    copy = BestWeights(torch.nn.Linear(2, 2), "val_loss", "min")
    copy.load_state_dict(hook.state_dict())
    assert copy.best_epoch == 2 and copy.restore() == 2 and copy.model.weight.eq(2).all()
    with pytest.raises(ValueError, match="restore_best state is for val_loss:min"):
        BestWeights(model, "val_accuracy", "max").load_state_dict(hook.state_dict())
    assert BestWeights(model, "val_loss", "min").restore() is None


@pytest.mark.parametrize(("train", "message"), [
    ({"restore_best": "val_loss"}, "train.restore_best: expected one of val_loss:min, val_accuracy:max, "
                                   "train_loss:min, train_accuracy:max or null, got 'val_loss'"),
    ({"restore_best": "val_f1:max"}, "train.restore_best: expected one of val_loss:min, val_accuracy:max, "
                                     "train_loss:min, train_accuracy:max or null, got 'val_f1:max'"),
    ({"restore_best": "val_loss:max"}, "train.restore_best: expected one of val_loss:min, val_accuracy:max, "
                                       "train_loss:min, train_accuracy:max or null, got 'val_loss:max'"),
    ({"restore_best": "val_loss:min", "early_stopping_patience": 3, "early_stopping_metric": "val_accuracy"},
     "train.restore_best: expected the metric early stopping watches (val_accuracy:max), got 'val_loss:min'"),
    ({"max_rollbacks": -1}, "train.max_rollbacks: "),
])
def test_bad_restore_best_and_max_rollbacks_are_one_line(tmp_path, train, message):
    path = write_params(tmp_path, small_params(train=train))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)



def test_a_milestone_carries_the_grad_scaler_state(tmp_path):
    from ml.train.checkpoints import MilestoneHook

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with CheckpointManager(tmp_path / "ckpt", async_save=False) as manager:
        hook = MilestoneHook(manager, model, optimizer, torch.Generator(), ["val_loss:min"], {}, None, scaler=scaler)
        state = LoopState(epoch=1, global_step=3)
        hook.on_epoch_end(state, {"val_loss": 0.5})
        name, _, _ = manager.best("val_loss")
        saved = manager.load_checkpoint("milestone", name)
    assert saved["scaler"]["scale"] == 1024.0 and saved["scheduler"] is None
