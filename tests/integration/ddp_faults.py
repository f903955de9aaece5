"""A ``train.model_factory`` for test_train_ddp.py: a small MLP with dropout whose rank
``DDP_TEST_KILL_RANK`` SIGKILLs itself at its ``DDP_TEST_KILL_AT``-th training forward pass (a rank
dying mid-step, in the middle of DDP's collectives). Without those variables it is an ordinary
model, so a straight run and a killed-then-resumed run train the same configuration.
"""

from __future__ import annotations

import os
import signal

import torch
from torch import nn

KILL_AT_ENV, KILL_RANK_ENV = "DDP_TEST_KILL_AT", "DDP_TEST_KILL_RANK"


class KillableMLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(hidden, num_classes))
        self.forwards = 0
        kill_at, kill_rank = os.environ.get(KILL_AT_ENV), os.environ.get(KILL_RANK_ENV, "1")
        self.kill_at = int(kill_at) if kill_at and os.environ.get("RANK") == kill_rank else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.forwards += 1
            if self.forwards == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.body(x.flatten(1))


def build(input_shape: tuple[int, ...], num_classes: int, hidden: int = 32) -> nn.Module:
    return KillableMLP(int(torch.tensor(input_shape).prod()), num_classes, hidden)
