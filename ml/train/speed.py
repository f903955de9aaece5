"""The speed switches of a training run, resolved from ``train.optimize`` (a preset, in the spirit
of optimization levels) and the explicit keys that override it, and the one place that turns a
precision into an autocast context and a GradScaler.

Presets:
    off: none of the switches (fp32, eager, contiguous, no activation checkpointing).
    basic: switches that leave the math alone: a fused AdamW, ``cudnn.benchmark`` on CUDA.
    advanced: basic + bf16 autocast (fp16 on a GPU without bf16), ``torch.compile`` default,
        channels_last for the cnn, TF32 matmuls on CUDA.
    max: advanced + ``max-autotune`` and activation checkpointing.
    auto: precision, compile and memory format measured on the job (:mod:`ml.train.autotune`);
        :func:`resolve_speed` gives the switches it starts from: ``off``'s, with the explicit keys.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ml.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SpeedSettings:
    """The switches a training run uses, after the preset and the explicit keys."""

    precision: str = "fp32"
    compile: str = "off"
    memory_format: str = "contiguous"
    activation_checkpointing: bool = False
    fused_optimizer: bool = False
    cudnn_benchmark: bool = False
    tf32: bool = False

    def as_params(self) -> dict[str, Any]:
        """The resolved settings as run params (``speed.*``)."""
        return {f"speed.{k}": v for k, v in asdict(self).items()}


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` has fast bf16 matrix units: CUDA compute capability >= 8.0, or a CPU with
    AMX or AVX-512 BF16 (what oneDNN dispatches bf16 matmuls and convolutions to)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_speed(cfg: Any, device: torch.device) -> SpeedSettings:
    """The switches for the TrainConfig ``cfg`` on ``device``: the preset's, each overridden by an
    explicit (non-null) key (``auto``: ``off``'s, which the autotuner's choice then completes).
    Raises ConfigError (one line) for fp16 on the CPU."""
    level = 0 if cfg.optimize == "auto" else ("off", "basic", "advanced", "max").index(cfg.optimize)
    cuda = device.type == "cuda"
    preset_precision = "fp32"
    if level >= 2:
        preset_precision = "bf16" if fast_bf16(device) else ("fp16" if cuda else "fp32")
    convolutional = cfg.model == "cnn"
    settings = SpeedSettings(
        precision=_explicit(cfg.precision, preset_precision),
        compile=_explicit(cfg.compile, ("off", "off", "default", "max-autotune")[level]),
        memory_format=_explicit(cfg.memory_format, "channels_last" if level >= 2 and convolutional else "contiguous"),
        activation_checkpointing=_explicit(cfg.activation_checkpointing, level >= 3),
        fused_optimizer=level >= 1,
        cudnn_benchmark=level >= 1 and cuda,
        tf32=level >= 2 and cuda,
    )
    if settings.precision == "fp16" and not cuda:
        raise ConfigError("train.precision: expected fp32 or bf16 on the CPU (fp16 needs CUDA and a GradScaler), "
                          "got 'fp16'")
    if settings.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: expected fp32 or fp16 on this GPU (it has no bf16), got 'bf16'")
    return settings


def _explicit(value: Any, preset: Any) -> Any:
    return preset if value is None else value


def apply_backend_flags(settings: SpeedSettings) -> None:
    """Process-wide backend switches of ``settings`` (cudnn autotuning, TF32 matmuls on CUDA)."""
    if settings.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if settings.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of the context a forward pass runs in: nothing for fp32, ``torch.autocast`` to the
    precision's dtype otherwise (weights, gradients and optimizer state stay fp32)."""
    if precision == "fp32":
        return nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler_for(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (whose small range underflows gradients without one); None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
