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
        flexible_size: The model takes any input size (global pooling before its classifier): it is built
            for, and fed, the dataset's recorded size; other models need inputs of exactly ``input_size``.
    """

    name: str
    input_size: tuple[int, int, int]
    num_classes: int
    args: dict = field(default_factory=dict)
    flexible_size: bool = False


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


    flexible_size: bool = False  # built for the dataset's image size (see `create_model_for_data`)


_REGISTRY: dict[str, _Entry] = {}
# 'prefix' -> resolver(argument) -> (canonical name, factory, description[, flexible_size]), for names like
# 'spec:conv32k5-fc10'.
_PREFIXES: dict[str, Callable[[str], tuple]] = {}
# 'prefix' -> lister(pattern) -> names without the prefix, for `list_models('timm:resnet*')`.
_LISTERS: dict[str, Callable[[str], list[str]]] = {}
# Arguments that only choose the starting weights. They are not recorded in the model's args (so not in its
# checkpoints): a trained model is rebuilt from its checkpoint without the weights file or the network.
INIT_ONLY_ARGS = ("pretrained", "pretrained_file")


def register_model(name: str, *, description: str = "") -> Callable:
    """Register a factory ``fn(num_classes=10, in_chans=..., **kw) -> CnnModel`` under ``name``."""

    def wrap(fn: Callable[..., CnnModel]) -> Callable[..., CnnModel]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = _Entry(name, fn, description or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap


def register_model_prefix(prefix: str, lister: Callable[[str], list[str]] | None = None) -> Callable:
    """Resolve every model name ``'<prefix>:<argument>'`` with the decorated ``resolver(argument)``.

    The resolver returns ``(canonical name, factory, description)`` and optionally a fourth item,
    ``flexible_size``; the canonical name is what the model's ``meta.name`` (and so its checkpoints) records.

    Args:
        prefix: The name part before ``:``.
        lister: ``lister(pattern)`` -> the arguments matching a shell-style pattern, for
            ``list_models('<prefix>:<pattern>')``; without it such patterns match nothing.
    """

    def wrap(resolver: Callable) -> Callable:
        if not prefix or ":" in prefix or prefix in _PREFIXES:
            raise ValueError(f"bad or duplicate model prefix {prefix!r}")
        _PREFIXES[prefix] = resolver
        if lister is not None:
            _LISTERS[prefix] = lister
        return resolver

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Model names matching a shell-style ``pattern`` (e.g. ``'tf-*'``), sorted.

    A pattern with a prefix (``'timm:resnet*'``) asks that prefix's lister; plain patterns list the registered
    models only.
    """
    prefix, sep, rest = pattern.partition(":")
    if sep and prefix.strip().lower() in _LISTERS:
        p = prefix.strip().lower()
        return sorted(f"{p}:{n}" for n in _LISTERS[p](rest or "*"))
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_prefixes() -> list[str]:
    """The prefixes whose names can be listed (``list_models('<prefix>:*')``)."""
    return sorted(_LISTERS)


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
    # Record the exact arguments so a checkpoint can rebuild the same model; values the factory resolved
    # itself (a timm model's input size and normalisation) are recorded too, so the rebuild needs nothing else.
    args = {k: v for k, v in kwargs.items() if k not in INIT_ONLY_ARGS}
    model.meta = replace(model.meta, name=entry.name, args={**args, **model.meta.args})
    return model


def create_model_for_data(name: str, num_classes: int, shape: tuple[int, int, int], *, resuming: bool = False,
                          **kwargs) -> CnnModel:
    """Build a model for a dataset of ``num_classes`` classes and images of ``shape`` (C, H, W).

    A model whose entry is flexible in size (e.g. ``timm:...``) is built for the dataset's image size, unless
    ``img_size`` is given. When ``resuming``, the arguments that only choose starting weights (`INIT_ONLY_ARGS`)
    are dropped: the checkpoint's weights replace them, and the weights file need not exist any more.
    """
    if resuming:
        kwargs = {k: v for k, v in kwargs.items() if k not in INIT_ONLY_ARGS}
    if model_entry(name).flexible_size and kwargs.get("img_size") is None:
        h, w = shape[1:]
        kwargs["img_size"] = h if h == w else [h, w]
    return create_model(name, num_classes=num_classes, in_chans=shape[0], **kwargs)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
