"""Declarative models: a compact spec string (or a TOML layer list) that builds a `CnnModel`, and a summary table.

A model name starting with ``spec:`` is a spec, e.g.::

    create_model("spec:conv32k5-pool2-conv64k5-pool2-fc1024-drop0.4-fc10")   # == tf-estimator-cnn's layers
    create_model("spec:nets/small.toml")                                       # a TOML layer list

Tokens, joined by ``-`` (case-insensitive):

==========================  ==========================================================================
``in<C>x<H>x<W>``           input shape (first token only; default ``in1x28x28``)
``conv<N>k<K>[s<S>][p<P>]`` N filters, K x K kernel, stride S (default 1), padding ``psame`` (default,
                            TensorFlow 'SAME': output ceil(H / S)) or ``pvalid``; ReLU unless an
                            activation is given as a suffix (``conv6k5tanh``) or as the next token
``fc<N>[act]``              dense layer of N units (ReLU unless an activation is given); a flatten is
                            implied before the first one. The LAST ``fc`` is the classifier: no
                            activation, and its width is the default ``num_classes``
``bn`` / ``bn<N>``          batch norm (2-D after convs, 1-D after fc). Right after a conv or fc it goes
                            before that layer's activation, and a conv followed by bn has no bias
``pool<K>[s<S>][p<P>]``     K x K max pooling, stride S (default K), SAME (ceil) rounding by default
``avgpool<K>...``           the same with average pooling; ``gap``: global average pooling
``drop<P>``                 dropout with probability P, e.g. ``drop0.4``
``relu|tanh|gelu|sigmoid``  an activation: sets the activation of the conv/fc just before it, or stands
``elu|silu|linear``         alone after anything else (``linear`` = none)
``flatten``                 explicit flatten (optional)
==========================  ==========================================================================

A TOML spec holds ``layers = [...]`` whose items are token strings or tables such as
``{type = "conv", filters = 32, kernel = 5, stride = 1, padding = "same", activation = "relu"}``,
plus an optional ``input = [C, H, W]``. It is turned into the token string, so the model's name (and
therefore its checkpoints) is ``spec:<tokens>`` and never depends on the file.

Like the registered models, a spec model takes ``num_classes``, ``in_chans`` and ``img_size`` keyword
arguments, has ``features`` (everything before the flatten) and ``head`` (flatten + the rest), and is
initialised the TensorFlow way (Glorot-uniform kernels, zero biases).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from ..modes import eval_mode
from .layers import Dropout, tf_init_
from .registry import CnnModel, ModelMeta, register_model_prefix

PREFIX = "spec"

# Activation name -> module factory (None: no activation).
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "elu": nn.ELU,
               "silu": nn.SiLU, "linear": None}
_ACT = "|".join(ACTIVATIONS)
_PAD = r"(?:p(same|valid))?"

_IN = re.compile(r"in(\d+)x(\d+)x(\d+)")
_CONV = re.compile(rf"conv(\d+)k(\d+)(?:s(\d+))?{_PAD}({_ACT})?")
_FC = re.compile(rf"fc(\d+)({_ACT})?")
_POOL = re.compile(rf"(max|avg)?pool(\d+)(?:s(\d+))?{_PAD}")
_BN = re.compile(r"bn(\d+)?")
_DROP = re.compile(r"drop(\d*\.?\d+)")


@dataclass
class _Block:
    """A conv or fc layer waiting for its (optional) batch norm and activation."""

    token: str
    layer: nn.Module
    bn: nn.Module | None = None
    act: str | None = None  # None: not given yet (defaults to relu)
    act_given: bool = False

    def modules(self) -> list[nn.Module]:
        act = ACTIVATIONS[self.act or "relu"]
        return [self.layer, *([self.bn] if self.bn is not None else []), *([act()] if act else [])]


@dataclass
class _Builder:
    """Builds features then head layer by layer, tracking the shape of one sample."""

    spec: str
    shape: tuple[int, ...]  # (C, H, W) in the features, (F,) once flattened
    features: list[nn.Module] = field(default_factory=list)
    head: list[nn.Module] = field(default_factory=list)
    pending: _Block | None = None

    @property
    def flat(self) -> bool:
        return len(self.shape) == 1

    def fail(self, token: str, why: str) -> ModelError:
        return ModelError(f"bad model spec {self.spec!r} at {token!r}: {why}")

    def add(self, token: str, *modules: nn.Module) -> None:
        """Append modules to the current part and update the sample shape (errors name the token)."""
        for m in modules:
            if m is None:
                continue
            try:
                with eval_mode(m), torch.no_grad():
                    out = m(torch.zeros(1, *self.shape))
            except RuntimeError as e:
                shape = "x".join(map(str, self.shape))
                raise self.fail(token, f"does not fit its {shape} input ({str(e).splitlines()[0][:80]})") from None
            if out.numel() == 0:
                raise self.fail(token, "leaves no output (the input is too small for it)")
            self.shape = tuple(out.shape[1:])
            (self.head if self.flat else self.features).append(m)

    def flush(self) -> None:
        """Emit the pending conv/fc block with its batch norm and activation."""
        if self.pending is not None:
            block, self.pending = self.pending, None
            self.add(block.token, *block.modules())

    def flatten(self, token: str) -> None:
        self.flush()
        if self.flat:
            raise self.fail(token, "the input is already flat")
        self.add(token, nn.Flatten())


def _conv(b: _Builder, token: str, m: re.Match) -> None:
    if b.flat:
        raise b.fail(token, "a convolution cannot follow a dense layer or flatten")
    out, k, s, pad, act = int(m[1]), int(m[2]), int(m[3] or 1), m[4] or "same", m[5]
    if out < 1 or k < 1 or s < 1:
        raise b.fail(token, "filters, kernel and stride must be >= 1")
    if pad == "valid":
        padding: int | str = 0
    elif k % 2:
        padding = k // 2  # odd kernel: symmetric padding gives TF SAME's ceil(H / stride)
    elif s == 1:
        padding = "same"  # even kernel: PyTorch pads asymmetrically, like TF
    else:
        raise b.fail(token, "SAME padding with an even kernel and stride > 1 is not supported; use pvalid")
    b.flush()
    conv = nn.Conv2d(b.shape[0], out, k, stride=s, padding=padding)
    b.pending = _Block(token, conv, act=act, act_given=act is not None)


def _fc(b: _Builder, token: str, m: re.Match) -> None:
    if not b.flat:
        b.flatten(token)
    b.flush()
    units, act = int(m[1]), m[2]
    if units < 1:
        raise b.fail(token, "a dense layer needs >= 1 unit")
    b.pending = _Block(token, nn.Linear(b.shape[0], units), act=act, act_given=act is not None)


def _pool(b: _Builder, token: str, m: re.Match) -> None:
    if b.flat:
        raise b.fail(token, "pooling needs a (C, H, W) input, not a flat one")
    b.flush()
    k, s, ceil = int(m[2]), int(m[3] or m[2]), (m[4] or "same") == "same"
    if k < 1 or s < 1:
        raise b.fail(token, "pool size and stride must be >= 1")
    kind = nn.AvgPool2d if m[1] == "avg" else nn.MaxPool2d
    b.add(token, kind(k, s, ceil_mode=ceil))  # ceil_mode: TF SAME's ceil(H / k) rounding when stride == k


def _gap(b: _Builder, token: str, m: re.Match) -> None:
    if b.flat:
        raise b.fail(token, "global pooling needs a (C, H, W) input")
    b.flush()
    b.add(token, nn.AdaptiveAvgPool2d(1))


def _bn(b: _Builder, token: str, m: re.Match) -> None:
    target = b.pending
    if target is not None and (target.bn is not None or target.act_given):
        b.flush()  # bn after an explicit activation: a layer of its own
        target = None
    if target is None:
        channels, flat = b.shape[0], b.flat
    elif isinstance(target.layer, nn.Conv2d):
        channels, flat = target.layer.out_channels, False
    else:
        channels, flat = target.layer.out_features, True
    if m[1] is not None and int(m[1]) != channels:
        raise b.fail(token, f"the layer before has {channels} channels, not {m[1]}")
    bn = (nn.BatchNorm1d if flat else nn.BatchNorm2d)(channels)
    if target is None:
        b.add(token, bn)
        return
    target.bn = bn
    if isinstance(target.layer, nn.Conv2d):  # the norm's shift replaces the conv bias
        c = target.layer
        target.layer = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, stride=c.stride,
                                 padding=c.padding, bias=False)


def _drop(b: _Builder, token: str, m: re.Match) -> None:
    p = float(m[1])
    if not 0 <= p < 1:
        raise b.fail(token, "dropout probability must be in [0, 1)")
    b.flush()
    b.add(token, Dropout(p))


def _flatten(b: _Builder, token: str, m: re.Match) -> None:
    b.flatten(token)


def _activation(b: _Builder, token: str, m: re.Match) -> None:
    if b.pending is not None and not b.pending.act_given:
        b.pending.act, b.pending.act_given = token, True
        return
    b.flush()
    act = ACTIVATIONS[token]
    if act is not None:
        b.add(token, act())


# Token pattern -> handler. Checked in order; the first full match wins.
_TOKENS = [
    (_CONV, _conv), (_FC, _fc), (_POOL, _pool), (re.compile("gap"), _gap), (_BN, _bn), (_DROP, _drop),
    (re.compile("flatten"), _flatten), (re.compile(_ACT), _activation),
]


def split_spec(spec: str) -> list[str]:
    """The tokens of a compact spec, lower-cased (``'conv32k5-POOL2'`` -> ``['conv32k5', 'pool2']``)."""
    tokens = [t.strip().lower() for t in spec.strip().split("-")]
    if not spec.strip() or any(not t for t in tokens):
        raise ModelError(f"bad model spec {spec!r}: empty token (tokens are joined by single '-')")
    return tokens


def parse_input(tokens: list[str]) -> tuple[tuple[int, int, int], list[str]]:
    """The input shape (from a leading ``inCxHxW`` token, default 1x28x28) and the remaining tokens."""
    m = _IN.fullmatch(tokens[0])
    if m is None:
        return (1, 28, 28), tokens
    shape = (int(m[1]), int(m[2]), int(m[3]))
    if min(shape) < 1:
        raise ModelError(f"bad model spec: input {tokens[0]!r} must have C, H, W >= 1")
    return shape, tokens[1:]


def classifier_width(spec: str) -> int:
    """The width of the last ``fc`` token: the default number of classes."""
    tokens = parse_input(split_spec(spec))[1]
    m = _FC.fullmatch(tokens[-1]) if tokens else None
    if m is None:
        raise ModelError(f"bad model spec {spec!r}: it must end with the classifier fcN (e.g. fc10)")
    if m[2]:
        raise ModelError(f"bad model spec {spec!r}: the classifier {tokens[-1]!r} gives logits and takes no "
                         "activation")
    if int(m[1]) < 1:
        raise ModelError(f"bad model spec {spec!r}: the classifier {tokens[-1]!r} needs >= 1 output")
    return int(m[1])


def build_from_spec(spec: str, num_classes: int | None = None, in_chans: int | None = None,
                    img_size: int | None = None) -> CnnModel:
    """Build the `CnnModel` a compact spec describes (see the module docstring for the tokens).

    Args:
        spec: The token string, without the ``spec:`` prefix.
        num_classes: Width of the classifier (default: the last ``fc`` token's width).
        in_chans: Input channels (default: the ``in`` token's, else 1).
        img_size: Square input side (default: the ``in`` token's H x W, else 28).

    Raises:
        ModelError: A token is unknown or does not fit (one line naming the token).
    """
    spec = "-".join(split_spec(spec))
    width = classifier_width(spec)
    (c, h, w), tokens = parse_input(split_spec(spec))
    size = (in_chans or c, img_size or h, img_size or w)
    b = _Builder(spec=spec, shape=size)
    *body, last = tokens
    for token in body:
        handler = next(((pattern, fn) for pattern, fn in _TOKENS if pattern.fullmatch(token)), None)
        if handler is None:
            raise b.fail(token, "unknown token; expected conv<N>k<K>[s<S>][psame|pvalid], pool<K>, avgpool<K>, "
                                "gap, bn, drop<P>, fc<N>, flatten or an activation (" + ", ".join(ACTIVATIONS) + ")")
        handler[1](b, token, handler[0].fullmatch(token))
    if not b.flat:
        b.flatten(last)
    b.flush()
    b.add(last, nn.Linear(b.shape[0], num_classes or width))
    if not b.features:
        raise ModelError(f"bad model spec {spec!r}: it has no layer before the first fc (features would be empty)")
    meta = ModelMeta(name=f"{PREFIX}:{spec}", input_size=size, num_classes=num_classes or width)
    return tf_init_(CnnModel(nn.Sequential(*b.features), nn.Sequential(*b.head), meta))


# ---------------------------------------------------------------- TOML layer lists

# Table type -> function(table) -> token text.
_TABLE_TOKENS = {
    "conv": lambda t: (f"conv{t['filters']}k{t['kernel']}" + (f"s{t['stride']}" if "stride" in t else "")
                       + (f"p{t['padding']}" if "padding" in t else "") + t.get("activation", "")),
    "fc": lambda t: f"fc{t['units']}" + t.get("activation", ""),
    "dense": lambda t: f"fc{t['units']}" + t.get("activation", ""),
    "pool": lambda t: (f"pool{t['size']}" + (f"s{t['stride']}" if "stride" in t else "")
                       + (f"p{t['padding']}" if "padding" in t else "")),
    "avgpool": lambda t: (f"avgpool{t['size']}" + (f"s{t['stride']}" if "stride" in t else "")
                          + (f"p{t['padding']}" if "padding" in t else "")),
    "bn": lambda t: "bn", "batchnorm": lambda t: "bn", "gap": lambda t: "gap", "flatten": lambda t: "flatten",
    "dropout": lambda t: f"drop{t['rate']}", "drop": lambda t: f"drop{t['rate']}",
    "activation": lambda t: t["name"],
}


def _table_token(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if not isinstance(item, dict) or "type" not in item:
        raise ModelError(f"{where}: each layer must be a token string or a table with a 'type'")
    make = _TABLE_TOKENS.get(str(item["type"]).lower())
    if make is None:
        raise ModelError(f"{where}: unknown layer type {item['type']!r}; known: {', '.join(_TABLE_TOKENS)}")
    try:
        return make(item)
    except KeyError as e:
        raise ModelError(f"{where}: layer {item['type']!r} needs {e.args[0]!r}") from None


def spec_from_toml(path: str | Path) -> str:
    """The compact spec of a TOML layer list (``input = [C, H, W]`` optional, ``layers = [...]``)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelError(f"cannot read model spec {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"model spec {path}: invalid TOML: {e}") from None
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ModelError(f"model spec {path}: needs a non-empty 'layers' list")
    tokens = [_table_token(item, f"model spec {path}") for item in layers]
    if "input" in data:
        shape = data["input"]
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) for v in shape)):
            raise ModelError(f"model spec {path}: input must be [C, H, W]")
        tokens.insert(0, "in{}x{}x{}".format(*shape))
    return "-".join(tokens)


@register_model_prefix(PREFIX)
def resolve_spec(argument: str):
    """``spec:<tokens>`` or ``spec:<file>.toml`` -> (canonical name, factory, description)."""
    spec = spec_from_toml(argument) if argument.strip().lower().endswith(".toml") else argument
    spec = "-".join(split_spec(spec))
    width = classifier_width(spec)
    (c, h, _w), _ = parse_input(split_spec(spec))
    build_from_spec(spec)  # fail now, with the token named, rather than at first use

    def factory(num_classes: int = width, in_chans: int = c, img_size: int = h) -> CnnModel:
        return build_from_spec(spec, num_classes, in_chans, img_size)

    return f"{PREFIX}:{spec}", factory, f"declarative model {spec}"


# ---------------------------------------------------------------- summary table

def _layer_detail(m: nn.Module) -> str:
    """A short description of a layer's settings (kernel, stride, padding, widths)."""
    details = {
        nn.Conv2d: lambda: (f"{m.in_channels}->{m.out_channels} {m.kernel_size[0]}x{m.kernel_size[1]}"
                            f"/{m.stride[0]} pad {m.padding if isinstance(m.padding, str) else m.padding[0]}"
                            + ("" if m.bias is not None else " no bias")),
        nn.Linear: lambda: f"{m.in_features}->{m.out_features}",
        nn.MaxPool2d: lambda: f"{m.kernel_size}/{m.stride}" + (" ceil" if m.ceil_mode else ""),
        nn.AvgPool2d: lambda: f"{m.kernel_size}/{m.stride}" + (" ceil" if m.ceil_mode else ""),
        nn.Dropout: lambda: f"p={m.p}",
    }
    fn = next((f for cls, f in details.items() if isinstance(m, cls)), None)
    return fn() if fn else ""


def describe_model(model: CnnModel) -> str:
    """A Keras ``model.summary()``-like table: layer, output shape of one sample, parameters, totals.

    Shapes come from running one zero input of ``model.meta.input_size`` through every leaf layer.
    Non-trainable parameters are the batch-norm running statistics (as Keras counts them).
    """
    rows: list[tuple[str, str, str, int]] = []
    leaves = [(f"{part}.{name}" if name else part, mod) for part in ("features", "head")
              for name, mod in getattr(model, part).named_modules() if not list(mod.children())]
    handles = []
    for name, mod in leaves:
        def record(mod, inputs, out, name=name):
            own = sum(p.numel() for p in mod.parameters(recurse=False) if p.requires_grad)
            rows.append((name, f"{type(mod).__name__} {_layer_detail(mod)}".strip(),
                         "x".join(map(str, out.shape[1:])), own))
        handles.append(mod.register_forward_hook(record))
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, *model.meta.input_size))
    finally:
        for h in handles:
            h.remove()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen += sum(b.numel() for n, b in model.named_buffers() if not n.endswith("num_batches_tracked"))
    head = ("Layer", "Type", "Output shape", "Params")
    table = [head, *((n, t, s, f"{p:,}") for n, t, s, p in rows)]
    w = [max(len(r[i]) for r in table) for i in range(4)]
    rule = "-" * (sum(w) + 6)
    lines = [f"Model: {model.meta.name}   input {'x'.join(map(str, model.meta.input_size))}   "
             f"{model.meta.num_classes} classes", rule.replace("-", "=")]
    for i, r in enumerate(table):
        lines.append(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]:>{w[3]}}")
        if i == 0:
            lines.append(rule)
    lines += [rule.replace("-", "="), f"Total params: {trainable + frozen:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {frozen:,}"]
    return "\n".join(lines)
