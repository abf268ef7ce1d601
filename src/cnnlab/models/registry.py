"""One model registry: ``@register_model`` on a factory, ``create_model(name, **kw)``, ``list_models(pattern)``.

Each registered factory returns a `CnnModel`: a module with the two common parts ``features`` (convolutional
stages) and ``head`` (flatten + dense layers), and a `ModelMeta` that data loading, plots and serving read.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import ModelError


@dataclass(frozen=True)
class ModelMeta:
    """What the rest of cnnlab needs to know about a model.

    Attributes:
        name: Registry name.
        input_size: Expected input (C, H, W); inputs are float in [0, 1].
        num_classes: Number of output logits.
        args: The keyword arguments the model was built with (saved in checkpoints to rebuild it).
    """

    name: str
    input_size: tuple[int, int, int]
    num_classes: int
    args: dict = field(default_factory=dict)


class CnnModel(nn.Module):
    """A classifier made of ``features`` then ``head``; ``forward`` returns logits [N, num_classes]."""

    def __init__(self, features: nn.Module, head: nn.Module, meta: ModelMeta):
        super().__init__()
        self.features = features
        self.head = head
        self.meta = meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[..., CnnModel]
    description: str


_REGISTRY: dict[str, _Entry] = {}
# 'prefix' -> resolver(argument) -> (canonical name, factory, description), for names like 'spec:conv32k5-fc10'.
_PREFIXES: dict[str, Callable[[str], tuple[str, Callable[..., CnnModel], str]]] = {}


def register_model(name: str, *, description: str = "") -> Callable:
    """Register a factory ``fn(num_classes=10, in_chans=..., **kw) -> CnnModel`` under ``name``."""

    def wrap(fn: Callable[..., CnnModel]) -> Callable[..., CnnModel]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = _Entry(name, fn, description or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap


def register_model_prefix(prefix: str) -> Callable:
    """Resolve every model name ``'<prefix>:<argument>'`` with the decorated ``resolver(argument)``.

    The resolver returns ``(canonical name, factory, description)``; the canonical name is what the model's
    ``meta.name`` (and so its checkpoints) records.
    """

    def wrap(resolver: Callable) -> Callable:
        if not prefix or ":" in prefix or prefix in _PREFIXES:
            raise ValueError(f"bad or duplicate model prefix {prefix!r}")
        _PREFIXES[prefix] = resolver
        return resolver

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (e.g. ``'tf-*'``), sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_entry(name: str) -> _Entry:
    """The registry entry of ``name`` (or of a ``prefix:argument`` name); unknown names raise `ModelError`."""
    prefix, sep, argument = name.partition(":")
    resolver = _PREFIXES.get(prefix.strip().lower()) if sep else None
    if resolver is not None:
        return _Entry(*resolver(argument))
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def create_model(name: str, **kwargs) -> CnnModel:
    """Build a registered model.

    Keyword arguments that are None are dropped, so unset options keep the model's own defaults.
    Unknown keyword arguments raise `ModelError`.
    """
    entry = model_entry(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    params = inspect.signature(entry.factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ModelError(f"model {name!r} takes no argument(s) {', '.join(unknown)}; "
                         f"it takes {', '.join(params)}")
    try:
        model = entry.factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelError(f"cannot build model {name!r} with {kwargs}: {e}") from None
    # Record the exact arguments so a checkpoint can rebuild the same model.
    model.meta = replace(model.meta, name=entry.name, args=dict(kwargs))
    return model


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
