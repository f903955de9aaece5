"""train: builds the model from params, runs the loop, writes the weights and the metric history."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ml.config import TrainConfig
from ml.data import Schema, load_split
from ml.io import atomic_write_json
from ml.loop import LoopHooks, LoopState, fit, resolve_device, seed_everything
from ml.model import MLP, ModelSpec, save_model
from ml.tracking import NullTracker, Tracker


@dataclass
class TrainResult:
    model: MLP
    state: LoopState

    @property
    def final_metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.state.history[-1].items() if k not in ("epoch", "step")}


def run_name(cfg: TrainConfig) -> str:
    """A readable run name from the hyperparameters that most often differ between runs."""
    return f"train-lr{cfg.lr:g}-bs{cfg.batch_size}"


def build_model(cfg: TrainConfig, schema: Schema) -> MLP:
    return MLP(ModelSpec(len(schema.features), cfg.hidden_sizes, schema.num_classes, cfg.dropout))


def train(cfg: TrainConfig, processed_dir: str | Path, tracker: Tracker | None = None,
          hooks: Sequence[LoopHooks] = ()) -> TrainResult:
    """The train stage: seeded from params, so the same params and data give the same weights."""
    tracker = tracker or NullTracker()
    device = resolve_device(cfg.device)
    generator = seed_everything(cfg.seed)
    schema = Schema.read(processed_dir)
    x_train, y_train = load_split(processed_dir, "train")
    x_val, y_val = load_split(processed_dir, "val")
    model = build_model(cfg, schema)
    model.set_input_stats(x_train)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    as_tensors = lambda x, y: (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))  # noqa: E731
    state = fit(model, optimizer, as_tensors(x_train, y_train), as_tensors(x_val, y_val),
                epochs=cfg.epochs, batch_size=cfg.batch_size, generator=generator, tracker=tracker, hooks=hooks)
    model.cpu().eval()
    save_model(model, cfg.model_dir)
    atomic_write_json(cfg.metrics_file, state.history)
    return TrainResult(model, state)
