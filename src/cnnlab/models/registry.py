"""One model registry: ``@register_model`` on a factory, ``create_model(name, **kw)``, ``list_models(pattern)``.

Each registered factory returns a `CnnModel`: a module with the two common parts ``features`` (convolutional
stages) and ``head`` (flatten + dense layers), and a `ModelMeta` that data loading, plots and serving read.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import CnnlabError, ModelError
from ..modes import eval_mode

MAX_SIDE = 4096  # pixels, per side of a model's input (and of an image shape a checkpoint records)


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
    Unknown keyword arguments, an ``img_size`` that is not a size and an input too small for the
    architecture raise `ModelError`.
    """
    return _create(name, kwargs)


def _takes(entry: _Entry, hidden: tuple[str, ...] = ()) -> list[str]:
    """The keyword arguments ``entry``'s factory takes, less ``hidden``."""
    return [p for p in inspect.signature(entry.factory).parameters if p not in hidden]


def _check_names(name: str, entry: _Entry, kwargs: dict, hidden: tuple[str, ...] = ()) -> None:
    """Refuse keyword arguments the factory does not take, listing the ones it does (less ``hidden``)."""
    unknown = sorted(set(kwargs) - set(_takes(entry)))
    if unknown:
        raise ModelError(f"model {name!r} takes no argument(s) {', '.join(unknown)}; "
                         f"it takes {', '.join(_takes(entry, hidden))}")


def _is_side(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_img_size(name: str, entry: _Entry, kwargs: dict) -> None:
    """``img_size`` is a positive int (the side of a square input) or, for a flexible-size model, [height, width]."""
    v = kwargs.get("img_size")
    sides = v if isinstance(v, (list, tuple)) else [v]
    if any(_is_side(x) and x > MAX_SIDE for x in sides):  # a checkpoint of it could not be read back
        raise ModelError(f"model {name!r}: img_size {v!r} is larger than cnnlab's limit of {MAX_SIDE} pixels a side")
    if v is None or _is_side(v):
        return
    if entry.flexible_size:
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_side(x) for x in v):
            return
        raise ModelError(f"model {name!r}: img_size must be a whole number >= 1 or [height, width], got {v!r}")
    raise ModelError(f"model {name!r}: img_size must be a whole number >= 1 (the side of its square input), "
                     f"got {v!r}")


# Inputs up to this many pixels are run once through a model when it is built, to refuse a size too small for
# its convolutions and pools in one line rather than at the first training step. Larger inputs skip it (a size
# that large fits every architecture here, and its forward pass would cost real time).
PROBE_MAX_PIXELS = 64 * 64


def _run_error(model: CnnModel) -> RuntimeError | None:
    """The error ``model`` raises on a zero input of its own size (batch of one, eval mode: no statistics change),
    or None when it runs."""
    with eval_mode(model), torch.no_grad():
        try:
            model(torch.zeros(1, *model.meta.input_size))
        except RuntimeError as e:
            return e
    return None


def _builds_at(entry: _Entry, kwargs: dict, side: int) -> bool:
    """Whether ``entry`` builds and runs with square inputs of ``side`` pixels."""
    try:
        return _run_error(entry.factory(**{**kwargs, "img_size": side})) is None
    except (RuntimeError, CnnlabError):
        return False


def _smallest_side(entry: _Entry, kwargs: dict, side: int) -> int | None:
    """The smallest square input side above ``side`` the model takes (None if none up to the probe's limit).

    Sizes that work form a range upward (each convolution and pool needs its input at least kernel-sized), so
    doubling then bisecting finds it with a few tiny builds.
    """
    limit = math.isqrt(PROBE_MAX_PIXELS)
    if side >= limit or "img_size" not in inspect.signature(entry.factory).parameters:
        return None
    low, high = side, side + 1  # low fails; find a high that works
    while not _builds_at(entry, kwargs, high):
        if high >= limit:
            return None
        low, high = high, min(2 * high, limit)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if _builds_at(entry, kwargs, mid) else (mid, high)
    return high


def _too_small(name: str, entry: _Entry, kwargs: dict, hw: tuple[int, int] | None, error: RuntimeError) -> Exception:
    """The one-line error for an input size the architecture cannot take, naming the smallest it can."""
    if hw is None:
        default = inspect.signature(entry.factory).parameters.get("img_size")
        side = kwargs.get("img_size", default.default if default is not None else None)
        hw = (side, side) if _is_side(side) else None
    smallest = _smallest_side(entry, kwargs, max(hw)) if hw is not None else None
    if smallest is None:
        return error  # not a matter of size: an internal error, with its traceback under CNNLAB_DEBUG
    return ModelError(f"model {name!r} takes inputs of at least {smallest}x{smallest}, not {hw[0]}x{hw[1]}; "
                      f"use img_size >= {smallest} and images at least that large")


def _create(name: str, kwargs: dict, hidden: tuple[str, ...] = ()) -> CnnModel:
    """`create_model`; an unknown argument's message does not offer the ``hidden`` ones."""
    entry = model_entry(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    _check_names(name, entry, kwargs, hidden)
    _check_img_size(name, entry, kwargs)
    try:
        model = entry.factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelError(f"cannot build model {name!r} with {kwargs}: {e}") from None
    except RuntimeError as e:  # e.g. a layer sized at build by a forward pass (`flat_features`) on too small an input
        raise _too_small(name, entry, kwargs, None, e) from None
    _, h, w = model.meta.input_size
    # Not on the meta device (a checkpoint's shape check, `check_weights_fit`): meta tensors hold no values, the
    # real build runs the probe, and a meta forward pass imports torch._dynamo (1.6 s of a 2.8 s `cnnlab predict`).
    probe = h * w <= PROBE_MAX_PIXELS and not any(p.is_meta for p in model.parameters())
    error = _run_error(model) if probe else None
    if error is not None:
        raise _too_small(name, entry, kwargs, (h, w), error) from None
    # Record the exact arguments so a checkpoint can rebuild the same model; values the factory resolved
    # itself (a timm model's input size and normalisation) are recorded too, so the rebuild needs nothing else.
    args = {k: v for k, v in kwargs.items() if k not in INIT_ONLY_ARGS}
    model.meta = replace(model.meta, name=entry.name, args={**args, **model.meta.args})
    return model


# Arguments a model trained on a dataset takes from the data: its number of classes and image channels.
DATA_ARGS = ("num_classes", "in_chans")


def check_model_args(name: str, args: dict, num_classes: int | None = None, in_chans: int | None = None) -> None:
    """Refuse the model arguments of a training config that the dataset sets, and unknown ones.

    Args:
        name: The model name.
        args: The config's ``model_args``.
        num_classes, in_chans: The dataset's, when known (for the message).

    Raises:
        ModelError: ``args`` names ``num_classes`` or ``in_chans`` (the data decides them), or an argument the
            model does not take (the message lists the ones a training config can set).
    """
    counts = {"num_classes": (num_classes, "class", "classes"), "in_chans": (in_chans, "channel", "channels")}
    for key, (n, one, many) in counts.items():
        if key in args:
            known = f" ({n} {one if n == 1 else many})" if n is not None else ""
            raise ModelError(f"model_args.{key} is set by the dataset{known}; remove it")
    _check_names(name, model_entry(name), {k: v for k, v in args.items() if v is not None}, DATA_ARGS)


def create_model_for_data(name: str, num_classes: int, shape: tuple[int, int, int], /, *, resuming: bool = False,
                          **kwargs) -> CnnModel:
    """Build a model for a dataset of ``num_classes`` classes and images of ``shape`` (C, H, W).

    A model whose entry is flexible in size (e.g. ``timm:...``) is built for the dataset's image size, unless
    ``img_size`` is given. When ``resuming``, the arguments that only choose starting weights (`INIT_ONLY_ARGS`)
    are dropped: the checkpoint's weights replace them, and the weights file need not exist any more.
    The first three arguments are positional-only, so a ``num_classes`` among ``kwargs`` (a config's
    ``model_args``) is refused with a message rather than clashing with them.

    Raises:
        ModelError: ``kwargs`` names an argument the data sets (`check_model_args`), or the model cannot be built.
    """
    check_model_args(name, kwargs, num_classes, shape[0])
    if resuming:
        kwargs = {k: v for k, v in kwargs.items() if k not in INIT_ONLY_ARGS}
    if model_entry(name).flexible_size and kwargs.get("img_size") is None:
        h, w = shape[1:]
        kwargs["img_size"] = h if h == w else [h, w]
    return _create(name, {"num_classes": num_classes, "in_chans": shape[0], **kwargs}, DATA_ARGS)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
