"""The classifier: an MLP that standardizes its raw input with statistics fixed at training time,
so a served model takes the same feature values the dataset holds."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ml.io import atomic_write, atomic_write_json


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network before loading its weights."""

    in_features: int
    hidden_sizes: tuple[int, ...]
    num_classes: int
    dropout: float


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = []
        width = spec.in_features
        for hidden in spec.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(spec.dropout)]
            width = hidden
        layers.append(nn.Linear(width, spec.num_classes))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(spec.in_features))
        self.register_buffer("std", torch.ones(spec.in_features))

    def set_input_stats(self, x: np.ndarray) -> None:
        """Fixes the standardization from the training features (constant columns get std 1)."""
        std = x.std(axis=0)
        self.mean.copy_(torch.from_numpy(x.mean(axis=0)))
        self.std.copy_(torch.from_numpy(np.where(std > 1e-8, std, 1.0).astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def save_model(model: MLP, model_dir: str | Path) -> Path:
    """Weights as safetensors plus the spec as JSON: loading them runs no pickle."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(model_dir / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    atomic_write_json(model_dir / "spec.json", asdict(model.spec))
    return model_dir


def load_model(model_dir: str | Path) -> MLP:
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "spec.json").read_text())
    spec = ModelSpec(raw["in_features"], tuple(raw["hidden_sizes"]), raw["num_classes"], raw["dropout"])
    model = MLP(spec)
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Class indices for a float32 feature matrix. ``model`` may also be a ``torch.export`` graph
    (MLflow's pt2 format), which is already in inference form and refuses ``eval()``."""
    try:
        model.eval()
    except NotImplementedError:
        pass
    device = next(model.parameters()).device
    out = [model(torch.from_numpy(x[i:i + batch_size]).to(device)).argmax(dim=1).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)
