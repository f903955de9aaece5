"""Releases: a training or milestone checkpoint published as ``production/<version>`` with weights,
config and a model card, and the references (``latest``, ``best_<metric>``, a name) that pick it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import torch

from ml.checkpoint.manager import CheckpointManager, SaveStats
from ml.checkpoint.policy import is_semver
from ml.checkpoint.reader import LATEST, CheckpointReader, InvalidVersion
from ml.errors import PipelineError

__all__ = ["export_release", "release_documents", "resolve_checkpoint"]


def resolve_checkpoint(manager: CheckpointReader, tier: str, ref: str) -> str:
    """The checkpoint ``ref`` names in ``tier``: a checkpoint name, ``latest``, or ``best_<metric>``
    (milestone tier).

    Raises:
        PipelineError: naming ``ref`` and what was expected.
    """
    names = manager.list(tier)
    if ref == LATEST:
        target = manager.latest(tier)
    elif ref.startswith("best_") and tier == "milestone":
        best = manager.best(ref[len("best_"):])
        target = best[0] if best else None
    else:
        target = ref if ref in names else None
    if target is None:
        raise PipelineError(f"{tier}/{ref}: no such committed checkpoint (expected a name from `mlops checkpoints "
                            f"list`, latest{', or best_<metric>' if tier == 'milestone' else ''})")
    return target


def release_documents(state: Mapping[str, Any], meta: Mapping[str, Any], *, tier: str, name: str, version: str,
                      description: str, intended_use: str, limitations: str,
                      now: dt.datetime | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(weights, config, model card)`` of a production release made from a training or milestone
    checkpoint's state: the weights are ``state["model"]``; the config and the card take the
    model spec, dataset version, metrics, run and commit from ``state["extra"]`` and the
    manifest's metadata where present.

    Raises:
        PipelineError: the state holds no model weights.
    """
    weights = state.get("model")
    if not isinstance(weights, Mapping) or not weights or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise PipelineError(f"{tier}/{name}: expected model weights under 'model' (a mapping of names to tensors)")
    extra = state.get("extra") if isinstance(state.get("extra"), Mapping) else {}
    config: dict[str, Any] = {
        key: extra[key] for key in ("model_spec", "classes", "features") if key in extra}
    if "config" in extra:
        config["training"] = extra["config"]
    config["tensors"] = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                         for k, v in weights.items()}
    loop = state.get("loop") if isinstance(state.get("loop"), Mapping) else {}
    history = loop.get("history") or [{}]
    last_epoch = {k: v for k, v in history[-1].items() if k not in ("epoch", "step")}
    metrics = dict(extra.get("metrics") or last_epoch)
    if "metric" in meta and "value" in meta:
        metrics.setdefault(meta["metric"], meta["value"])
    source = {"tier": tier, "checkpoint": name, "step": meta.get("step", loop.get("global_step")),
              "epoch": meta.get("epoch", loop.get("epoch"))}
    source.update({key: extra[key] for key in ("run_id", "git_commit", "fingerprint") if extra.get(key) is not None})
    card: dict[str, Any] = {
        "version": version, "description": description, "intended_use": intended_use, "limitations": limitations,
        "created_at": (now or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds"),
        "source": source, "metrics": metrics,
        "files": {"weights": "model.safetensors", "config": "config.json"},
    }
    if "dataset" in extra:
        card["dataset"] = extra["dataset"]
    if "environment" in extra:
        card["environment"] = extra["environment"]
    return dict(weights), config, card


def export_release(manager: CheckpointManager, tier: str, ref: str, *, version: str, description: str,
                   intended_use: str, limitations: str) -> tuple[str, SaveStats]:
    """Publishes the training or milestone checkpoint ``ref`` (see :func:`resolve_checkpoint`) as
    ``production/<version>``. Returns the checkpoint name and the save's stats."""
    if tier not in ("training", "milestone"):
        raise PipelineError(f"tier {tier!r}: expected training or milestone (releases are made from those)")
    if not is_semver(version):
        raise InvalidVersion(f"production version {version!r} is not a semantic version (e.g. 1.4.0)")
    name = resolve_checkpoint(manager, tier, ref)
    state = manager.load_checkpoint(tier, name, rank=0)
    weights, config, card = release_documents(state, manager.describe(tier, name), tier=tier, name=name,
                                              version=version, description=description,
                                              intended_use=intended_use, limitations=limitations)
    return name, manager.save_production_checkpoint(weights, version, config, card)
