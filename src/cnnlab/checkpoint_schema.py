"""Checks on a checkpoint's JSON header and weights, made before any model is built from them.

A checkpoint file may come from anywhere (a download, a shared folder). Its header decides how big a model
is built and how big every input is resized to, so it is checked first: types, required keys, bounded sizes,
no model name that reads a file (``spec:<path>.toml``), a config TrainConfig accepts, one class name per
output. Then the architecture the header names is built on PyTorch's ``meta`` device (shapes only, no memory)
and its parameter shapes are compared with the file's tensors, so a header that asks for a huge model
without carrying its weights is refused before a byte is allocated. Weights must be finite.

Every failure is a `CheckpointError` (one line, exit 2 from the CLI).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import CheckpointError, CnnlabError
from .models.registry import INIT_ONLY_ARGS, MAX_SIDE

MAX_CHANNELS = 64  # image channels (1 grey, 3 RGB, 4 RGBA; more for unusual sensors)
MAX_CLASSES = 100_000
MAX_NAME_CHARS = 4096  # model names (an inline spec can be long), dataset names
MAX_CLASS_NAME_CHARS = 1024
MAX_INT = 2**53  # larger integers lose precision in JSON readers other than Python's
_ARG_TYPES = (bool, int, float, str, type(None))
# Model arguments with a meaning cnnlab knows, and their allowed range.
_ARG_BOUNDS = {"img_size": (1, MAX_SIDE), "in_chans": (1, MAX_CHANNELS), "num_classes": (1, MAX_CLASSES)}


def _fail(where: str, what: str) -> CheckpointError:
    return CheckpointError(f"{where}: bad checkpoint header: {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(d: dict, key: str, kind: type | tuple, where: str, path: str) -> Any:
    """``d[key]``, which must exist and be of ``kind`` (ints exclude bools)."""
    if key not in d:
        raise _fail(where, f"{path}{key} is missing")
    v = d[key]
    ok = _is_int(v) if kind is int else isinstance(v, kind)
    if not ok:
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _fail(where, f"{path}{key} must be {name}, got {type(v).__name__}")
    return v


def _check_shape(v: Any, where: str, path: str) -> tuple[int, int, int]:
    """A (C, H, W) list of bounded positive ints."""
    if not (isinstance(v, list) and len(v) == 3 and all(_is_int(x) for x in v)):
        raise _fail(where, f"{path} must be [C, H, W] (three integers)")
    c, h, w = v
    if not (1 <= c <= MAX_CHANNELS and 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise _fail(where, f"{path} {v} is out of range (channels 1 to {MAX_CHANNELS}, sides 1 to {MAX_SIDE})")
    return c, h, w


def _check_model_name(name: str, where: str) -> None:
    """Registered names and inline specs only: a ``spec:<file>.toml`` name would make loading read a path."""
    if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise _fail(where, f"model.name must be 1 to {MAX_NAME_CHARS} printable characters")
    prefix, sep, argument = name.partition(":")
    if not sep or prefix.strip().lower() != "spec":
        return
    if argument.strip().lower().endswith(".toml") or any(ch in argument for ch in "/\\"):
        raise _fail(where, "model.name is a spec file path; checkpoints hold inline specs only")
    from .models.spec import parse_input, split_spec

    try:
        shape, _ = parse_input(split_spec(argument))
    except CnnlabError as e:
        raise _fail(where, f"model.name: {e}") from None
    _check_shape(list(shape), where, "model.name's input token")


def _check_scalar(v: Any, key: str, where: str) -> None:
    if not isinstance(v, _ARG_TYPES):
        raise _fail(where, f"model.args.{key} must be a number, string, boolean, null or a short list of numbers")
    if isinstance(v, float) and not math.isfinite(v):
        raise _fail(where, f"model.args.{key} is {v}")
    if _is_int(v) and abs(v) > MAX_INT or isinstance(v, str) and len(v) > MAX_NAME_CHARS:
        raise _fail(where, f"model.args.{key} is too large")


def _check_args(args: dict, where: str) -> None:
    """Scalars, or short lists of numbers (a timm model's ``mean``/``std``, ``img_size`` as [H, W])."""
    for k, v in args.items():
        if k in INIT_ONLY_ARGS:  # they would make loading download weights or read a file the header names
            raise _fail(where, f"model.args.{k} chooses starting weights and has no place in a checkpoint")
        values = v if isinstance(v, list) else [v]
        if isinstance(v, list) and not (1 <= len(v) <= 4 and all(isinstance(x, (int, float)) and
                                                                 not isinstance(x, bool) for x in v)):
            raise _fail(where, f"model.args.{k} must be a list of 1 to 4 numbers")
        for x in values:
            _check_scalar(x, k, where)
            if k in _ARG_BOUNDS and x is not None:
                low, high = _ARG_BOUNDS[k]
                if not _is_int(x) or not low <= x <= high:
                    raise _fail(where, f"model.args.{k} must be an integer from {low} to {high}, got {x!r}")


def _check_model(header: dict, where: str) -> dict:
    model = _get(header, "model", dict, where, "")
    name = _get(model, "name", str, where, "model.")
    _check_model_name(name, where)
    if not all(isinstance(k, str) for k in _get(model, "args", dict, where, "model.")):
        raise _fail(where, "model.args keys must be strings")
    _check_args(model["args"], where)
    _check_shape(_get(model, "input_size", list, where, "model."), where, "model.input_size")
    n = _get(model, "num_classes", int, where, "model.")
    if not 1 <= n <= MAX_CLASSES:
        raise _fail(where, f"model.num_classes must be 1 to {MAX_CLASSES}, got {n}")
    return model


def _check_data(header: dict, model: dict, where: str) -> None:
    data = _get(header, "data", dict, where, "")
    dataset = _get(data, "dataset", str, where, "data.")
    if len(dataset) > MAX_NAME_CHARS:
        raise _fail(where, "data.dataset is too long")
    classes = _get(data, "classes", list, where, "data.")
    if len(classes) != model["num_classes"]:
        raise _fail(where, f"data.classes names {len(classes)} classes but the model has "
                           f"{model['num_classes']} outputs")
    for i, c in enumerate(classes):
        if not isinstance(c, str) or len(c) > MAX_CLASS_NAME_CHARS:
            raise _fail(where, f"data.classes[{i}] must be a string of at most {MAX_CLASS_NAME_CHARS} characters")
    c, _, _ = _check_shape(_get(data, "shape", list, where, "data."), where, "data.shape")
    if c != model["input_size"][0]:
        raise _fail(where, f"data.shape has {c} channels but the model takes {model['input_size'][0]}")
    if "preprocess" in data and not isinstance(data["preprocess"], dict):
        raise _fail(where, "data.preprocess must be an object")


def _check_config(header: dict, where: str) -> None:
    from .config import make_config

    config = _get(header, "config", dict, where, "")
    try:
        make_config(config)
    except CnnlabError as e:
        raise _fail(where, f"config: {e}") from None
    except (TypeError, ValueError, OverflowError) as e:  # e.g. a list where a number belongs
        raise _fail(where, f"config: {type(e).__name__}: {str(e)[:120]}") from None


def _check_optimizer(header: dict, where: str) -> None:
    if "optimizer" not in header or header["optimizer"] is None:
        return
    opt = _get(header, "optimizer", dict, where, "")
    groups = _get(opt, "param_groups", list, where, "optimizer.")
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise _fail(where, "optimizer.param_groups must be objects with a params list")
    scalars = opt.get("scalars", {})
    if not isinstance(scalars, dict) or not all(isinstance(v, dict) for v in scalars.values()):
        raise _fail(where, "optimizer.scalars must map parameter ids to objects")
    for pid in scalars:
        if not (isinstance(pid, str) and pid.isdigit() and len(pid) < 10):
            raise _fail(where, f"optimizer.scalars key {pid[:20]!r} is not a parameter index")


def validate_header(header: dict, where: str = "checkpoint") -> None:
    """Check a checkpoint header's layout, types and sizes; build nothing.

    Args:
        header: The parsed ``cnnlab`` JSON of a checkpoint.
        where: The file, for the message.

    Raises:
        CheckpointError: The first problem found, in one line.
    """
    from .checkpoint import FORMAT_VERSION

    if not isinstance(header, dict):
        raise _fail(where, f"it is a JSON {type(header).__name__}, not an object")
    version = _get(header, "format_version", int, where, "")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where} has checkpoint format {version}, newer than this cnnlab reads "
                              f"({FORMAT_VERSION}); upgrade cnnlab")
    if version < 1:
        raise _fail(where, f"format_version must be at least 1, got {version}")
    step = _get(header, "step", int, where, "")
    if not 0 <= step <= MAX_INT:
        raise _fail(where, f"step must be 0 to {MAX_INT}, got {step}")
    model = _check_model(header, where)
    _check_data(header, model, where)
    _check_config(header, where)
    _check_optimizer(header, where)
    if not isinstance(header.get("extra", {}), dict):
        raise _fail(where, "extra must be an object")


def check_finite(tensors: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Refuse NaN or infinite weights (``model/`` and ``ema/`` tensors): every prediction would be garbage."""
    for key, t in tensors.items():
        if key.startswith(("model/", "ema/")) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where}: weights {key} hold NaN or infinite values; the checkpoint is unusable")


def check_weights_fit(header: dict, tensors: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Build the header's architecture on the meta device (no memory) and compare it with the file's weights.

    Call after `validate_header`. A header naming a model far bigger (or other) than its weights is refused
    here, before a real model is allocated.
    """
    from .models import create_model

    m = header["model"]
    try:
        with torch.device("meta"):
            model = create_model(m["name"], **m["args"])
    except CnnlabError as e:
        raise CheckpointError(f"{where}: cannot rebuild its model: {e}") from None
    except (TypeError, ValueError, RuntimeError, NotImplementedError, OverflowError) as e:
        raise CheckpointError(f"{where}: cannot rebuild its model: {type(e).__name__}: {str(e)[:120]}") from None
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for prefix in ("model", "ema"):
        saved = {k[len(prefix) + 1:]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix + "/")}
        if prefix == "ema" and not saved:
            continue
        missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        bad = sorted(k for k in set(own) & set(saved) if own[k] != saved[k])
        if missing or unexpected or bad:
            parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) \
                + ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []) \
                + ([f"shape of {bad[0]} is {saved[bad[0]]}, model has {own[bad[0]]}"] if bad else [])
            raise CheckpointError(f"{where} does not match the model its header names ({'; '.join(parts)})")
    if tuple(m["input_size"]) != tuple(model.meta.input_size) or m["num_classes"] != model.meta.num_classes:
        raise _fail(where, f"model.input_size/num_classes {m['input_size']}/{m['num_classes']} differ from the "
                           f"model's {list(model.meta.input_size)}/{model.meta.num_classes}")


def validate_checkpoint(header: dict, tensors: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """All checks, cheapest first: header schema, weights against the named architecture, finite weights."""
    validate_header(header, where)
    check_weights_fit(header, tensors, where)
    check_finite(tensors, where)
