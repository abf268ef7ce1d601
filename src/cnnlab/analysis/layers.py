"""Find the parts of a model to look at, through the parts every zoo model shares (``model.features``).

Two numberings, both printed by ``cnnlab plot RUN layers``:

* conv layer N: the N-th ``nn.Conv2d`` met walking ``model.features`` (for filter plots);
* feature module N: the N-th module of ``model.features`` in ``named_modules`` order, containers
  included, so a residual block and the convolutions inside it can both be picked (for activations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelError
from ..infer import eval_mode, to_input
from ..preprocess import flexible_size


def _features(model: nn.Module) -> nn.Module:
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Module):
        raise ModelError(f"{type(model).__name__} has no .features part to inspect")
    return features


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """(name inside features, module) of every 2-D convolution in ``model.features``, in forward order."""
    return [(n, m) for n, m in _features(model).named_modules() if isinstance(m, nn.Conv2d)]


def feature_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module inside ``model.features`` (the container itself excluded)."""
    return [(n, m) for n, m in _features(model).named_modules() if n]


def conv_layer(model: nn.Module, layer: int) -> tuple[str, nn.Conv2d]:
    """The ``layer``-th conv layer; a bad index raises ModelError naming how many there are."""
    convs = conv_layers(model)
    if not convs:
        raise ModelError("the model has no Conv2d layer in .features")
    if not -len(convs) <= layer < len(convs):
        raise ModelError(f"conv layer {layer} out of range: the model has {len(convs)} conv layers "
                         f"(0..{len(convs) - 1})")
    return convs[layer]


def feature_module(model: nn.Module, layer: int) -> tuple[str, nn.Module]:
    """The ``layer``-th module of ``model.features``; a bad index raises ModelError."""
    mods = feature_modules(model)
    if not -len(mods) <= layer < len(mods):
        raise ModelError(f"layer {layer} out of range: model.features has {len(mods)} modules (0..{len(mods) - 1}); "
                         "see `cnnlab plot RUN_DIR layers`")
    return mods[layer]


@dataclass(frozen=True)
class FilterStats:
    """Statistics of all the weights of one conv layer, as the CIFAR tutorial prints them."""

    min: float
    max: float
    mean: float
    std: float

    @property
    def abs_max(self) -> float:
        """Half-width of the symmetric colour scale (so 0 is white in a diverging map)."""
        return max(abs(self.min), abs(self.max))

    def lines(self) -> list[str]:
        """``Min: .., Max: ..`` and ``Mean: .., Stdev: ..`` exactly as ``plot_conv_weights`` prints them."""
        return [f"Min: {self.min:.5f}, Max: {self.max:.5f}", f"Mean: {self.mean:.5f}, Stdev: {self.std:.5f}"]


def filter_weights(model: nn.Module, layer: int) -> tuple[str, torch.Tensor, FilterStats]:
    """(name, weights [out, in, kh, kw] as float on CPU, statistics over the whole layer)."""
    name, conv = conv_layer(model, layer)
    w = conv.weight.detach().float().cpu()
    # numpy's std (population, ddof=0) as the tutorial's w.std()
    stats = FilterStats(float(w.min()), float(w.max()), float(w.mean()), float(w.std(unbiased=False)))
    return name, w, stats


@torch.no_grad()
def layer_output(model: nn.Module, image_u8: torch.Tensor, layer: int,
                 crop: tuple[int, int] | None = None) -> tuple[str, torch.Tensor]:
    """Output of feature module ``layer`` for one uint8 image [C, H, W] at the run's size (``crop``: the run's
    recorded centre crop; any other size than the model's input is a ModelError).

    Returns (name, activations [channels, h, w] as float on CPU). Runs the model in eval mode.
    """
    name, module = feature_module(model, layer)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        device = next(model.parameters()).device
        x = to_input(image_u8[None].to(device), model.meta.input_size, crop=crop,
                     flexible=flexible_size(model.meta), name=model.meta.name)
        with eval_mode(model):
            model(x)
    finally:
        handle.remove()
    out = captured[0][0].float().cpu()
    if out.ndim != 3:
        raise ModelError(f"layer {layer} ({name}: {type(module).__name__}) gives shape {tuple(out.shape)}, "
                         "not a stack of feature maps")
    return name, out


@torch.no_grad()
def describe_layers(model: nn.Module) -> list[dict]:
    """One row per feature module: index, name, type, output shape (C, H, W), and conv index when a conv."""
    shapes: dict[str, tuple] = {}
    mods = feature_modules(model)
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: shapes.__setitem__(n, tuple(out.shape[1:])))
             for n, m in mods]
    try:
        device = next(model.parameters()).device
        with eval_mode(model):
            model.features(torch.zeros(1, *model.meta.input_size, device=device))
    finally:
        for h in hooks:
            h.remove()
    conv_index = {n: i for i, (n, _) in enumerate(conv_layers(model))}
    return [{"index": i, "name": n, "type": type(m).__name__, "shape": shapes.get(n), "conv": conv_index.get(n)}
            for i, (n, m) in enumerate(mods)]
