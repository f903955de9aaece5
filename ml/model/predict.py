"""The one way a trained classifier predicts: evaluation, the champion/challenger gate and the
serving endpoint all go through :func:`inference_model` and :func:`predict`.

A model can arrive in three forms: our :class:`ml.model.architectures.Classifier` (an MLP, CNN, ViT
or a factory's network; training, evaluation),
an ``nn.Module`` unpickled by MLflow, or a ``torch.export`` program (MLflow's default ``pt2``
format). An exported program is already in inference form and refuses ``eval()``, and calling it
costs about three times the eager network on a single row (input flattening and guards on every
call); :func:`inference_model` deals with both once, when the model is loaded.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any, NamedTuple

import numpy as np
import torch

from ml.model.architectures import MLP, Classifier, ModelSpec


class Prediction(NamedTuple):
    """Class indices (int64), and the softmax probabilities (float32, rows x classes) when asked for."""

    classes: np.ndarray
    probabilities: np.ndarray | None = None


def inference_model(model: Any, width: int | None = None) -> Any:
    """``model`` ready to predict: in eval mode where it has one; given the input ``width``, a loaded
    model (an exported pt2 program above all) is replaced by the :class:`MLP` its weights describe
    when that network gives the same outputs on a probe, and kept as it is otherwise."""
    with suppress(NotImplementedError):  # an exported (pt2) program is already in inference form
        model.eval()
    if width is None or isinstance(model, Classifier):
        return model
    return _eager_equivalent(model, width)


@torch.inference_mode()
def predict(model: Any, x: np.ndarray, *, batch_size: int = 1024, probabilities: bool = False) -> Prediction:
    """Predicts a float32 feature matrix in batches of ``batch_size`` rows, on the model's device.
    ``model`` should have gone through :func:`inference_model` (an :class:`MLP` in training mode
    would predict with dropout)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    classes, probs = [], []
    for i in range(0, len(x), batch_size):
        logits = model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])).to(device))
        classes.append(logits.argmax(dim=1).cpu())
        if probabilities:
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
    if not classes:
        return Prediction(np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32) if probabilities else None)
    return Prediction(torch.cat(classes).numpy(), torch.cat(probs).numpy() if probabilities else None)


def _eager_equivalent(module: Any, width: int) -> Any:
    """The :class:`MLP` rebuilt from ``module``'s weights when they fit it and it gives the same
    outputs on a probe; otherwise ``module`` itself."""
    state = module.state_dict()
    layers = sorted((k for k in state if k.startswith("net.") and k.endswith(".weight")),
                    key=lambda k: int(k.split(".")[1]))
    if not layers or any(state[k].ndim != 2 for k in layers):
        return module
    spec = ModelSpec(int(state[layers[0]].shape[1]), tuple(int(state[k].shape[0]) for k in layers[:-1]),
                     int(state[layers[-1]].shape[0]), 0.0)
    try:
        eager = MLP(spec)
        eager.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError):
        return module
    eager.eval()
    probe = torch.rand(32, width, generator=torch.Generator().manual_seed(0)) * 16
    with torch.inference_mode():
        expected = module(probe)
        same = expected.shape == (32, spec.num_classes) and torch.allclose(eager(probe), expected, rtol=1e-4, atol=1e-4)
    return eager if same else module
