"""``mlops checkpoints list|verify|prune|export``, run as the command a user types."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ml.checkpoint.manager import CheckpointManager
from tests.conftest import run_module

pytestmark = pytest.mark.slow

EXTRA = {"model_spec": {"in_features": 4, "hidden_sizes": [8], "num_classes": 3, "dropout": 0.1},
         "dataset": {"md5": "0123abcd.dir", "source": "sklearn:digits"}, "metrics": {"val_accuracy": 0.75},
         "run_id": "run-7", "git_commit": "cafe"}


def ckpt_state(step: int) -> dict:
    return {"model": {"net.0.weight": torch.full((8, 4), float(step)), "net.0.bias": torch.zeros(8)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
            "loop": {"global_step": step, "epoch": step // 10}, "extra": EXTRA}


def mlops(project: Path, *args: str):
    return run_module("mlops.cli", "checkpoints", *args, cwd=project, timeout=120)


def one_error_line(proc) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture
def checkpoints(project: Path) -> Path:
    """Three training checkpoints and two milestones under the params file's checkpoint.dir."""
    root = project / "checkpoints"
    with CheckpointManager(root, keep_last=3) as mgr:
        for step in (10, 20, 30):
            mgr.save_training_checkpoint(ckpt_state(step), step).result()
        mgr.save_milestone_checkpoint(ckpt_state(20), "val_loss", 0.4, "min", epoch=2, step=20)
        mgr.save_milestone_checkpoint(ckpt_state(30), "val_loss", 0.3, "min", epoch=3, step=30)
    return root


def test_list_shows_committed_checkpoints_and_pointers_from_the_params_dir(project, checkpoints):
    proc = mlops(project, "list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "training/  (3 committed)"
    assert "step-00000030" in lines[3] and "[latest]" in lines[3] and "step 30" in lines[3]
    assert any("val_loss=0.3 (min)" in line and "[best_val_loss]" in line for line in lines)

    listing = json.loads(mlops(project, "list", "--tier", "milestone", "--json", "--dir", str(checkpoints)).stdout)
    milestone = listing["tiers"]["milestone"]
    assert list(listing["tiers"]) == ["milestone"]
    assert milestone["pointers"] == {"best_val_loss": "val_loss-epoch-0003-step-00000030"}
    assert [c["meta"]["value"] for c in milestone["checkpoints"]] == [0.4, 0.3]


def test_verify_passes_then_names_the_altered_file_and_exits_non_zero(project, checkpoints):
    assert mlops(project, "verify").returncode == 0
    victim = checkpoints / "training" / "step-00000020" / "model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    proc = mlops(project, "verify", "--tier", "training")
    assert "ok       training/step-00000010" in proc.stdout
    assert "CORRUPT  training/step-00000020:" in proc.stdout and "model.safetensors: CRC-32C differs" in proc.stdout
    assert "1 of 3 checkpoints" in one_error_line(proc) and proc.returncode == 2
    assert mlops(project, "verify", "step-00000030").returncode == 0


def test_prune_keeps_the_newest_and_refuses_bad_input(project, checkpoints):
    proc = mlops(project, "prune", "--keep", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"tier": "training", "deleted": ["step-00000010", "step-00000020"],
                                       "kept": ["step-00000030"]}
    assert "--keep two: expected a whole number >= 0" in one_error_line(mlops(project, "prune", "--keep", "two"))
    assert "--tier production: releases are never pruned" in one_error_line(mlops(project, "prune", "--tier",
                                                                                    "production", "--keep", "0"))


def test_export_publishes_a_release_with_card_and_config_from_the_checkpoint(project, checkpoints):
    card_args = ["--description", "digits classifier", "--intended-use", "demos", "--limitations", "8x8 digits"]
    proc = mlops(project, "export", "milestone", "best_val_loss", "--version", "1.2.0", *card_args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("exported milestone/val_loss-epoch-0003-step-00000030 as production/1.2.0")
    release = checkpoints / "production" / "1.2.0"
    assert {p.name for p in release.iterdir()} == {"model.safetensors", "config.json", "model_card.json",
                                                   "manifest.json"}
    card = json.loads((release / "model_card.json").read_text())
    assert card["dataset"] == EXTRA["dataset"] and card["metrics"] == {"val_accuracy": 0.75, "val_loss": 0.3}
    assert card["description"] == "digits classifier" and card["source"]["run_id"] == "run-7"
    assert json.loads((release / "config.json").read_text())["model_spec"] == EXTRA["model_spec"]
    with CheckpointManager(checkpoints, read_only=True) as mgr:
        assert torch.equal(mgr.load_production("1.2.0").weights["net.0.weight"], torch.full((8, 4), 30.0))

    assert "production version 1.2.0 already exists" in one_error_line(
        mlops(project, "export", "training", "latest", "--version", "1.2.0", *card_args))
    assert "not a semantic version" in one_error_line(
        mlops(project, "export", "training", "latest", "--version", "v2", *card_args))
    assert "training/step-99: no such committed checkpoint" in one_error_line(
        mlops(project, "export", "training", "step-99", "--version", "2.0.0", *card_args))


def test_a_missing_directory_or_an_unknown_tier_is_one_line(project, tmp_path):
    assert f"--dir {tmp_path / 'nope'}: no such directory" in one_error_line(
        mlops(project, "list", "--dir", str(tmp_path / "nope")))
    (project / "checkpoints").mkdir()
    assert "--tier weekly: expected one of training, milestone, production" in one_error_line(
        mlops(project, "list", "--tier", "weekly"))
