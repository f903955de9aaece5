"""The classifier: an MLP that standardizes its raw input with statistics fixed at training time,
so a served model takes the same feature values the dataset holds. Saving and loading it live in
:mod:`ml.model.serialization`, predicting with it in :mod:`ml.model.predict`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


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
