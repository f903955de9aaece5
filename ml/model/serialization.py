"""The trained model on disk: weights as safetensors plus the spec as JSON, so loading them runs no
pickle (MLflow's logged copy is the tracker's business, not this one)."""

from __future__ import annotations

import json
from pathlib import Path

from ml.io import atomic_write, atomic_write_json
from ml.model.architectures import Classifier, ModelSpec, build_model


def save_model(model: Classifier, model_dir: str | Path) -> Path:
    """Writes ``model.safetensors`` and ``spec.json`` into ``model_dir`` (each atomically)."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(model_dir / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    atomic_write_json(model_dir / "spec.json", model.spec.to_json())
    return model_dir


def load_model(model_dir: str | Path) -> Classifier:
    """The model :func:`save_model` wrote, on the CPU, in eval mode."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "spec.json").read_text())
    model = build_model(ModelSpec.from_json(raw))
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    return model.eval()
