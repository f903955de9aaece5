"""The one resume path (:func:`ml.train.checkpoints.resume`): what it restores, the states of
stateful callbacks it hands back, and when it starts fresh instead."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from ml.checkpoint.manager import CheckpointManager
from ml.checkpoint.state import training_state
from ml.train.checkpoints import CheckpointContext, CheckpointHook, resume, resume_stage
from ml.train.loop import LoopState

REPO = Path(__file__).resolve().parents[2]


def parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.Generator().manual_seed(seed)


def save(mgr: CheckpointManager, state: LoopState, *, extra=None, callbacks=None) -> None:
    model, optimizer, generator = parts()
    hook = CheckpointHook(mgr, model, optimizer, generator=generator, extra=lambda: extra or {},
                          callback_states=(lambda: callbacks) if callbacks is not None else None)
    hook.on_epoch_end(state, {})
    mgr.wait()


def test_loop_state_round_trips_through_its_state_dict():
    state = LoopState(epoch=2, global_step=17, batch_in_epoch=3, epoch_generator_state=torch.Generator().get_state(),
                      history=[{"epoch": 1, "val_loss": 0.5}], stop=False)
    again = LoopState()
    again.load_state_dict(state.state_dict())
    assert (again.epoch, again.global_step, again.batch_in_epoch, again.history, again.stop) == (2, 17, 3,
                                                                                                 state.history, False)
    assert torch.equal(again.epoch_generator_state, state.epoch_generator_state)


def test_callback_states_are_saved_and_handed_back_on_resume(tmp_path):
    window = {"losses": torch.tensor([0.5, 0.25, 0.125]), "count": 3}
    patience = {"best": 0.42, "bad_epochs": 2, "mode": "min"}
    with CheckpointManager(tmp_path) as mgr:
        save(mgr, LoopState(epoch=1, global_step=5), extra={"fingerprint": "f"},
             callbacks={"anomaly": window, "early_stopping": patience})
        model, optimizer, generator = parts(seed=1)
        resumed = resume(mgr, model, optimizer, generator=generator, fingerprint="f", epochs=3)
    assert resumed.name == "epoch-0001-step-00000005" and resumed.state.global_step == 5
    assert set(resumed.callbacks) == {"anomaly", "early_stopping"}
    assert torch.equal(resumed.callbacks["anomaly"]["losses"], window["losses"])
    assert resumed.callbacks["anomaly"]["count"] == 3 and resumed.callbacks["early_stopping"] == patience
    assert torch.equal(model.weight, parts()[0].weight)  # the saved weights, not seed 1's
    assert resumed.extra == {"fingerprint": "f"}


def test_a_checkpoint_without_callback_states_resumes_with_none(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        save(mgr, LoopState(epoch=1, global_step=5))
        resumed = resume(mgr, *parts()[:2], generator=parts()[2])
    assert resumed.state is not None and resumed.callbacks == {}


def test_fresh_starts_say_why(tmp_path):
    with CheckpointManager(tmp_path / "empty") as mgr:
        assert resume(mgr, *parts()[:2], generator=parts()[2]).note == "starting fresh: no training checkpoint"
    with CheckpointManager(tmp_path / "other") as mgr:
        save(mgr, LoopState(epoch=1, global_step=5), extra={"fingerprint": "a"})
        other = resume(mgr, *parts()[:2], generator=parts()[2], fingerprint="b")
        finished = resume(mgr, *parts()[:2], generator=parts()[2], fingerprint="a", epochs=1)
    assert other.state is None and "of another configuration" in other.note
    assert finished.state is None and "of a finished training" in finished.note
    with CheckpointManager(tmp_path / "stopped") as mgr:
        save(mgr, LoopState(epoch=1, global_step=5, stop=True))
        stopped = resume(mgr, *parts()[:2], generator=parts()[2])
    assert stopped.state is None and "of a finished training" in stopped.note
    with CheckpointManager(tmp_path / "corrupt") as mgr:
        save(mgr, LoopState(epoch=1, global_step=5))
        (mgr.tier_dir("training") / "epoch-0001-step-00000005" / "model.safetensors").write_bytes(b"x")
        corrupt = resume(mgr, *parts()[:2], generator=parts()[2])
    assert corrupt.state is None and corrupt.note.startswith("starting fresh: no valid checkpoint")


def test_the_stage_skips_checkpoints_under_fresh_or_resume_false(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        save(mgr, LoopState(epoch=1, global_step=5), extra={"fingerprint": "f"})
        for ctx, why in ((CheckpointContext(SimpleNamespace(resume=True), "f", fresh=True), "--fresh"),
                         (CheckpointContext(SimpleNamespace(resume=False), "f"), "checkpoint.resume is false")):
            outcome = resume_stage(mgr, ctx, 3, *parts())
            assert outcome.state is None and outcome.note == f"starting fresh ({why})"
        assert resume_stage(mgr, CheckpointContext(SimpleNamespace(resume=True), "f"), 3, *parts()).state.epoch == 1


def test_a_training_state_holds_the_loop_as_a_plain_dict():
    model, optimizer, generator = parts()
    state = training_state(model, optimizer, loop=LoopState(global_step=4).state_dict(), generator=generator,
                           callbacks={"x": {"n": 1}})
    assert state["loop"]["global_step"] == 4 and state["callbacks"] == {"x": {"n": 1}}


def test_the_checkpoint_package_does_not_import_the_training_loop():
    code = ("import sys, ml.checkpoint.manager, ml.checkpoint.release, ml.checkpoint.state, ml.checkpoint.s3; "
            "print(sorted(m for m in sys.modules if m == 'ml.train' or m.startswith('ml.train.')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
