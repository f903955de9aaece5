"""The classifiers: an MLP, a small CNN, a small vision transformer, or a user's own network from a
factory. Each takes the dataset's feature rows as they are (flat, as the data contract and the
serving endpoint know them), standardizes them with statistics fixed at training time and views
them in the spec's ``input_shape`` (flat, or an image such as 1x8x8), so every architecture is
served and compared with the same signature. Saving and loading live in
:mod:`ml.model.serialization`, predicting in :mod:`ml.model.predict`.

Activation checkpointing uses torch's ``apply_activation_checkpointing``: it wraps every submodule
that marks itself a block (``activation_checkpoint_block = True``) in a non-reentrant
``torch.utils.checkpoint`` wrapper whose state-dict hooks keep the plain module's keys.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ml.errors import ConfigError

BUILT_IN = ("mlp", "cnn", "vit")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network before loading its weights.

    Attributes:
        in_features: Width of a feature row (what the model is called with: rows x in_features).
        hidden_sizes: Hidden widths of the MLP (unused by the other architectures).
        num_classes: Output logits.
        dropout: Dropout probability (MLP hidden layers, the CNN's and ViT's head).
        name: ``mlp``, ``cnn``, ``vit`` or ``factory``.
        input_shape: The shape a row is viewed in (empty: flat), e.g. ``(1, 8, 8)``.
        kwargs: Architecture keyword arguments (``train.model_kwargs``).
        factory: ``package.module:function`` for ``name == "factory"``.
    """

    in_features: int
    hidden_sizes: tuple[int, ...]
    num_classes: int
    dropout: float
    name: str = "mlp"
    input_shape: tuple[int, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    factory: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "hidden_sizes": list(self.hidden_sizes),
                "num_classes": self.num_classes, "dropout": self.dropout, "name": self.name,
                "input_shape": list(self.input_shape), "kwargs": dict(self.kwargs), "factory": self.factory}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ModelSpec:
        """The spec :meth:`to_json` wrote (a spec from before architectures existed is an MLP)."""
        return cls(int(raw["in_features"]), tuple(raw["hidden_sizes"]), int(raw["num_classes"]), float(raw["dropout"]),
                   raw.get("name", "mlp"), tuple(raw.get("input_shape") or ()), dict(raw.get("kwargs") or {}),
                   raw.get("factory"))


def image_shape(in_features: int, input_shape: tuple[int, ...] | None, key: str = "train.input_shape") -> tuple[int, ...]:
    """``input_shape`` checked against the row width, or a square one-channel image when None."""
    if input_shape:
        if math.prod(input_shape) != in_features:
            raise ConfigError(f"{key}: expected a shape of {in_features} values (the dataset's features), "
                              f"got {list(input_shape)}")
        return tuple(input_shape)
    side = math.isqrt(in_features)
    if side * side != in_features:
        raise ConfigError(f"{key}: expected a shape such as [channels, height, width] ({in_features} features "
                          "are not a square image), got null")
    return (1, side, side)


class Classifier(nn.Module):
    """Standardizes raw feature rows, views them in ``spec.input_shape`` and runs ``body``. Images go
    in the memory format of the model (``channels_last`` when the model was converted to it)."""

    def __init__(self, spec: ModelSpec, body: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        if body is not None:
            self.body = body
        self.register_buffer("mean", torch.zeros(spec.in_features))
        self.register_buffer("std", torch.ones(spec.in_features))
        self.channels_last = False

    def set_input_stats(self, x: np.ndarray) -> None:
        """Fixes the standardization from the training features (constant columns get std 1)."""
        std = x.std(axis=0)
        self.mean.copy_(torch.from_numpy(x.mean(axis=0)))
        self.std.copy_(torch.from_numpy(np.where(std > 1e-8, std, 1.0).astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.spec.input_shape:
            x = x.reshape(-1, *self.spec.input_shape)  # -1, not len(x): an exported batch size stays dynamic
            if self.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
        return self.body(x)


class MLP(Classifier):
    """The default network: Linear-ReLU-Dropout per hidden width (state keys ``net.*``, ``mean``, ``std``)."""

    def __init__(self, spec: ModelSpec) -> None:
        layers: list[nn.Module] = []
        width = spec.in_features
        for hidden in spec.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(spec.dropout)]
            width = hidden
        layers.append(nn.Linear(width, spec.num_classes))
        super().__init__(spec)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class ConvBlock(nn.Module):
    """conv 3x3 - GroupNorm - GELU: the norm is per sample, so a smaller micro-batch keeps the math."""

    activation_checkpoint_block = True

    def __init__(self, c_in: int, c_out: int, groups: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(math.gcd(groups, c_out), c_out)
        self.act = nn.GELU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))


class ConvNet(nn.Module):
    """Conv blocks (pooling after every second one), global average pooling, dropout, linear head."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, dropout: float,
                 channels: tuple[int, ...] = (32, 64), groups: int = 8) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"train.input_shape: expected [channels, height, width] for the cnn, got {list(input_shape)}")
        widths = [input_shape[0], *channels]
        self.blocks = nn.Sequential(*(ConvBlock(widths[i], widths[i + 1], groups, pool=i % 2 == 1)
                                      for i in range(len(channels))))
        self.head = nn.Sequential(GlobalAvgPool(), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(widths[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class GlobalAvgPool(nn.Module):
    """The mean over height and width, as ``avg_pool2d`` over the whole map: its backward hands the
    last block a gradient in the activations' memory format. ``AdaptiveAvgPool2d(1)`` is a mean
    whose backward expands to a contiguous (NCHW) gradient, and under channels_last the last block's
    GELU backward then ran several times slower on mismatched layouts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x, x.shape[-2:])


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash / memory-efficient
    kernels on CUDA)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"train.model_kwargs.heads: expected a divisor of dim {dim}, got {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LN x), then x + MLP(LN x)."""

    activation_checkpoint_block = True

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patches embedded by a strided conv, learned position embeddings, transformer blocks, mean
    pooling over the patches, linear head."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, dropout: float, patch_size: int = 2,
                 dim: int = 64, depth: int = 3, heads: int = 4, mlp_ratio: int = 4) -> None:
        super().__init__()
        if len(input_shape) != 3 or input_shape[1] % patch_size or input_shape[2] % patch_size:
            raise ConfigError(f"train.model_kwargs.patch_size: expected a divisor of the image's height and width "
                              f"{list(input_shape[1:])}, got {patch_size}")
        patches = (input_shape[1] // patch_size) * (input_shape[2] // patch_size)
        self.embed = nn.Conv2d(input_shape[0], dim, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.randn(1, patches, dim) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


_BODIES: dict[str, Callable[..., nn.Module]] = {"cnn": ConvNet, "vit": VisionTransformer}


def load_factory(path: str) -> Callable[..., Any]:
    """The function ``package.module:function`` names; a one-line error when it cannot be imported."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"train.model_factory: expected 'package.module:function', got {path!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"train.model_factory: cannot import {path!r} ({exc})") from None
    if not callable(fn):
        raise ConfigError(f"train.model_factory: {path!r} is not callable")
    return fn


def _check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], fixed: int, name: str) -> None:
    params = list(inspect.signature(fn).parameters.values())[fixed:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    allowed = [p.name for p in params]
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(f"train.model_kwargs.{key}: unknown for model {name}; expected one of "
                              f"{', '.join(allowed) or 'none'}")


def build_model(spec: ModelSpec) -> Classifier:
    """The untrained network ``spec`` describes; unknown names, kwargs and factories that do not
    return an ``nn.Module`` are one-line :class:`ConfigError`\\ s."""
    if spec.name == "mlp":
        if spec.kwargs:
            raise ConfigError(f"train.model_kwargs.{next(iter(spec.kwargs))}: unknown for model mlp "
                              "(it takes train.hidden_sizes and train.dropout)")
        return MLP(spec)
    if spec.name in _BODIES:
        body_cls = _BODIES[spec.name]
        _check_kwargs(body_cls.__init__, spec.kwargs, 4, spec.name)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.kwargs.items()}
        return Classifier(spec, body_cls(spec.input_shape, spec.num_classes, spec.dropout, **kwargs))
    if spec.name == "factory":
        fn = load_factory(spec.factory or "")
        try:
            body = fn(spec.input_shape or (spec.in_features,), spec.num_classes, **spec.kwargs)
        except TypeError as exc:
            raise ConfigError(f"train.model_factory: {spec.factory!r} refused its arguments ({exc})") from None
        if not isinstance(body, nn.Module):
            raise ConfigError(f"train.model_factory: expected {spec.factory!r} to return an nn.Module, "
                              f"got {type(body).__name__}")
        return Classifier(spec, body)
    raise ConfigError(f"train.model: expected one of {', '.join(BUILT_IN)} (or train.model_factory), got {spec.name!r}")


def set_channels_last(model: Classifier) -> None:
    """Converts the weights and the model's image inputs to channels_last (NHWC)."""
    model.to(memory_format=torch.channels_last)
    model.channels_last = True


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recomputes the activations of every marked block in backward (non-reentrant checkpointing);
    returns how many blocks were wrapped. State-dict keys stay those of the plain model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    def marked(m: nn.Module) -> bool:
        return bool(getattr(m, "activation_checkpoint_block", False))

    count = sum(1 for m in model.modules() if marked(m))
    apply_activation_checkpointing(model, check_fn=marked)
    return count
