"""Any timm architecture as a cnnlab model: ``create_model("timm:resnet18", num_classes=5, pretrained=True)``.

The model has cnnlab's usual parts: ``features`` (the input normalisation, then timm's ``forward_features``)
and ``head`` (timm's pooling, then the classifier layer, moved out of the timm network so the state dict
holds it once). Inputs are float [0, 1] as for every cnnlab model; the pretrained config's mean and std are
applied inside the model, so ONNX export and serving need no preprocessing of their own.

Arguments:
    num_classes, in_chans: From the dataset (timm adapts pretrained stem weights to other channel counts).
    img_size: Input height (or [height, width]) the run feeds; default: the pretrained config's.
    pretrained: Load timm's pretrained weights through its own hub loading (needs the network once).
    pretrained_file: Load the weights from a local ``.safetensors`` / ``.pth`` file instead.
    mean, std, interpolation: Default: the pretrained config's (recorded in the model's args, so a
        checkpoint rebuilds the same model without timm's config, the weights file or the network).
    drop_rate, drop_path_rate: timm's dropout before the classifier and stochastic depth.

``timm`` is an optional dependency (``pip install 'cnnlab[timm]'``), imported only when a ``timm:`` model is
used; ``list_models('timm:resnet*')`` lists timm's names.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from ..extras import require_extra
from .registry import CnnModel, ModelMeta, register_model_prefix

PREFIX = "timm"


def _timm():
    """The timm module, or one line saying which extra installs it."""
    require_extra({"timm": "timm"}, "timm", "timm: models")
    import timm

    return timm


class _Body(nn.Module):
    """Normalise a float [0, 1] batch with the pretrained mean/std, then timm's ``forward_features``."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        # Not persistent: the values are in the model's args, and a run started from another run's weights
        # (init_from) keeps its own normalisation.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features((x - self.mean) / self.std)


class _Head(nn.Module):
    """timm's ``forward_head`` up to its pre-logits features (pooling, ...), then the classifier layer."""

    def __init__(self, net: nn.Module, classifier: nn.Module):
        super().__init__()
        # A plain attribute, not a submodule: the network's parameters belong to `features` only.
        object.__setattr__(self, "_net", net)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self._net.forward_head(x, pre_logits=True))


def _fit_channels(values, in_chans: int) -> list[float]:
    """Per-channel mean/std for ``in_chans`` channels from the config's (usually 3) values."""
    values = [float(v) for v in values]
    if len(values) == in_chans:
        return values
    avg = sum(values) / len(values)  # grey images: the average of the colour channels, as timm's data config
    return [avg] * in_chans


def _take_classifier(net: nn.Module, name: str, arch: str) -> nn.Module:
    """Remove the classifier layer ``name`` (e.g. 'fc', 'head.fc') from ``net`` and return it."""
    if not isinstance(name, str) or not name:
        raise ModelError(f"timm:{arch} has no single classifier layer (it has {name!r}); not supported")
    parent_name, _, leaf = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    classifier = getattr(parent, leaf)
    setattr(parent, leaf, nn.Identity())
    return classifier


def _size(img_size, default: tuple[int, int, int]) -> tuple[int, int]:
    if img_size is None:
        return tuple(default[1:])
    if isinstance(img_size, int):
        return img_size, img_size
    if isinstance(img_size, (list, tuple)) and len(img_size) == 2 and all(isinstance(v, int) for v in img_size):
        return tuple(img_size)
    raise ModelError(f"img_size must be an int or [height, width], got {img_size!r}")


def build_timm(arch: str, num_classes: int = 1000, in_chans: int = 3, img_size=None, pretrained: bool = False,
               pretrained_file: str | None = None, mean: list[float] | None = None, std: list[float] | None = None,
               interpolation: str | None = None, drop_rate: float | None = None,
               drop_path_rate: float | None = None) -> CnnModel:
    """Build ``timm:<arch>`` as a `CnnModel` (arguments as in the module docstring)."""
    timm = _timm()
    extra = {k: v for k, v in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)) if v is not None}
    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise ModelError(f"pretrained_file {pretrained_file}: no such file")
        extra["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    try:
        net = timm.create_model(arch, pretrained=bool(pretrained or pretrained_file), num_classes=num_classes,
                                in_chans=in_chans, **extra)
    except Exception as e:  # noqa: BLE001  (timm, torch and the hub raise many types; the user needs one line)
        what = f"weights from {pretrained_file}" if pretrained_file else "pretrained weights" if pretrained else ""
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"cannot build timm:{arch}{' with ' + what if what else ''}: {first}") from None
    cfg = net.pretrained_cfg
    default = tuple(cfg.get("input_size", (in_chans, 224, 224)))
    h, w = _size(img_size, default)
    if cfg.get("fixed_input_size") and (h, w) != tuple(default[1:]):
        raise ModelError(f"timm:{arch} takes {default[1]}x{default[2]} inputs only, not {h}x{w}; "
                         f"use images of that size (e.g. folder:DIR?size={default[1]})")
    mean = _fit_channels(mean if mean is not None else cfg.get("mean", (0.0,)), in_chans)
    std = _fit_channels(std if std is not None else cfg.get("std", (1.0,)), in_chans)
    if len(mean) != in_chans or len(std) != in_chans or min(std) <= 0:
        raise ModelError(f"mean and std need {in_chans} values (std > 0), got {mean} and {std}")
    interpolation = interpolation or cfg.get("interpolation", "bilinear")
    classifier = _take_classifier(net, cfg.get("classifier"), arch)
    args = {"img_size": h if h == w else [h, w], "mean": mean, "std": std, "interpolation": interpolation}
    meta = ModelMeta(name=f"{PREFIX}:{arch}", input_size=(in_chans, h, w), num_classes=num_classes, args=args,
                     flexible_size=True)
    return CnnModel(_Body(net, mean, std), _Head(net, classifier), meta)


def _describe(arch: str) -> str:
    return f"timm {arch} (float [0, 1] input, normalised inside)"


def _list(pattern: str) -> list[str]:
    return list(_timm().list_models(pattern or "*"))


@functools.lru_cache(maxsize=64)
def _check_name(arch: str) -> None:
    timm = _timm()
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ModelError(f"unknown timm model {arch!r}{hint} (list them: cnnlab models 'timm:PATTERN')")


@register_model_prefix(PREFIX, lister=_list)
def resolve_timm(argument: str):
    """``timm:<architecture>`` -> (canonical name, factory, description, flexible_size)."""
    arch = argument.strip()
    _check_name(arch)

    def factory(num_classes: int = 1000, in_chans: int = 3, img_size=None, pretrained: bool = False,
                pretrained_file: str | None = None, mean: list[float] | None = None,
                std: list[float] | None = None, interpolation: str | None = None,
                drop_rate: float | None = None, drop_path_rate: float | None = None) -> CnnModel:
        return build_timm(arch, num_classes, in_chans, img_size, pretrained, pretrained_file, mean, std,
                          interpolation, drop_rate, drop_path_rate)

    return f"{PREFIX}:{arch}", factory, _describe(arch), True
