"""Training configuration: one frozen, typed dataclass; recipes (TOML) plus ``key=value`` overrides.

Unknown keys and values of the wrong type are rejected with a `ConfigError` (nanoGPT's rule, without
its ``exec``). The resolved config is printed at the start of a run and saved beside it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "muon")
SCHEDULES = ("constant", "onecycle", "cosine", "linear", "triangle")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
SELECT_METRICS = ("val_accuracy", "val_loss")
CLASS_WEIGHTS = ("none", "balanced")
SAMPLERS = ("shuffle", "balanced")
TTA_MODES = ("none", "flip", "translate", "flip-translate")
MAX_SEED = 2**63 - 1  # a signed 64-bit integer: what every seed consumer (torch, numpy, JSON readers) takes
# The largest finite float32: the optimisers hold learning rates and weight decay as float32 scalars, and a
# larger value stops the first step with an overflow.
FLOAT32_MAX = 3.4028234663852886e38


def opt(default, help: str):
    """A config field with its default and a one-line description (shown by ``cnnlab train --help``).

    Mutable defaults (dict, list) get a fresh copy per instance.
    """
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (the model directory and data location are not part of it)."""

    # What to train.
    model: str = opt("tf-estimator-cnn", "model name (see `cnnlab models`)")
    dataset: str = opt("mnist", "dataset name or folder:PATH (see `cnnlab datasets`)")
    model_args: dict = opt({}, "extra keyword arguments for create_model (model_args.dropout=0.3, ...)")
    # Optimisation.
    optimizer: str = opt("sgd", "sgd | momentum | nesterov | adam | adamw | muon (Muon for convolution filters, "
                              "Nesterov SGD for the rest)")
    lr: float = opt(0.001, "peak learning rate")
    momentum: float = opt(0.9, "momentum for the momentum / nesterov optimizers (and muon's other parameters)")
    weight_decay: float = opt(0.0, "weight decay of weight matrices (not biases or norms); decoupled for adamw")
    norm_lr_mult: float = opt(1.0, "lr multiplier of biases and norm parameters (1-D tensors); airbench94 trains "
                                   "its batch norms' shifts 64x faster than its weights")
    muon_lr: float = opt(0.24, "muon: peak learning rate of the convolution filters (the schedule scales it as lr)")
    muon_momentum: float = opt(0.6, "muon: momentum of the convolution filters")
    muon_norm: bool = opt(False, "muon: before each step rescale each filter bank to norm sqrt(out channels) instead "
                                 "of decaying it (airbench94_muon; the filters feed batch norms, so only their "
                                 "direction counts)")
    adam_eps: float = opt(1e-8, "Adam epsilon (tf.train.AdamOptimizer's default; Keras uses 1e-7)")
    batch_size: int = opt(100, "global batch size (split over processes under torchrun)")
    steps: int = opt(1000, "optimisation steps (ignored when epochs > 0)")
    epochs: float = opt(0.0, "> 0: train this many passes over the training set instead of `steps`")
    schedule: str = opt("constant", "learning-rate schedule: constant | onecycle | cosine | linear | triangle")
    warmup: float = opt(0.0, "fraction of steps spent warming up (onecycle / triangle peak position)")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy loss, in [0, 1)")
    ema: float = opt(0.0, "> 0: keep an exponential moving average of the weights with this decay; evaluate it")
    # Augmentation (batched, per sample, applied to training batches only).
    random_crop: bool = opt(False, "random crops to the model's input size (else centre crop)")
    translate: int = opt(0, "random shifts of up to this many pixels (reflect padding)")
    flip: bool = opt(False, "random horizontal flips")
    alternate_flip: bool = opt(False, "with flip: mirror each image in every other epoch (half of them from the "
                                      "first), not at random: airbench's alternating flip, each image seen both ways "
                                      "in any two epochs")
    hue: float = opt(0.0, "max hue shift (fraction of the colour circle), as tf.image.random_hue")
    brightness: float = opt(0.0, "max additive brightness change, as tf.image.random_brightness")
    contrast: tuple[float, float] = opt((1.0, 1.0), "contrast factor range, as tf.image.random_contrast")
    saturation: tuple[float, float] = opt((1.0, 1.0), "saturation factor range")
    cutout: int = opt(0, "side of a random square set to zero (0: off)")
    random_resized_crop: tuple[float, float] = opt(
        (0.0, 0.0), "RandomResizedCrop area range, e.g. 0.35,1: crop that fraction of the image (aspect 3/4..4/3), "
        "resized to the model input; 0,0: off")
    tta: str = opt("none", "test-time augmentation: none | flip | translate | flip-translate (averaged logits)")
    # Fine-tuning (see cnnlab.train.finetune).
    init_from: str = opt("", "start from the weights of this run directory or .safetensors checkpoint "
                             "(the classifier starts afresh when the classes differ)")
    freeze_steps: int = opt(0, "train only the head for this many steps, then unfreeze the backbone")
    freeze_epochs: float = opt(0.0, "train only the head for this many epochs, then unfreeze the backbone")
    backbone_lr_mult: float = opt(1.0, "the backbone's (features') learning rate as a multiple of lr")
    # Reproducibility and bookkeeping.
    seed: int = opt(0, "seed of the weights, batch order and augmentation draws")
    log_every: int = opt(100, "log a training line every this many steps")
    log_probs: int = opt(0, "print the softmax probabilities of this many batch samples in each log line")
    ckpt_every: int = opt(1000, "save a checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = opt(3, "number of newest checkpoints kept in the model directory")
    eval_every: int = opt(0, "evaluate on the validation split (else the test split) every this many steps "
                                 "and keep the best (0: only at the end)")
    eval_batch_size: int = opt(1000, "batch size for evaluation")
    # Execution.
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    threads: int = opt(0, "CPU threads for torch (0: torch's default)")
    precision: str = opt("fp32", "fp32 | bf16 | fp16 | auto (autocast of the forward pass, loss in fp32; "
                                     "fp16 on CUDA only, with a GradScaler; auto: bf16 where the device "
                                     "runs it natively, else fp32; the run records the choice)")
    channels_last: bool = opt(True, "train and evaluate in channels-last memory layout")
    compile: bool = opt(False, "torch.compile the training model (the first steps pay for the compilation)")
    # Training controls (train/controls.py).
    select_metric: str = opt("val_accuracy", "evaluation metric that picks best.safetensors: val_accuracy or val_loss")
    patience: int = opt(0, "stop after this many evaluations without improving select_metric (0: off)")
    min_delta: float = opt(0.0, "smallest change of select_metric that counts as an improvement")
    class_weights: str = opt("none", "none | balanced: weight the loss by n / (classes * count of the class)")
    sampler: str = opt("shuffle", "shuffle (epochs) | balanced: every class drawn equally often, with replacement")
    clip_grad_norm: float = opt(0.0, "clip the global gradient norm to this value (0: off)")
    accumulate: int = opt(1, "split each batch_size batch into this many micro-batches (same step, less memory)")
    mixup: float = opt(0.0, "MixUp Beta(alpha, alpha) parameter (0: off)")
    cutmix: float = opt(0.0, "CutMix Beta(alpha, alpha) parameter (0: off; with mixup, half the samples each)")
    data_memory_gb: float = opt(0.0, "memory budget for the training images in GiB: a larger split (an image folder) "
                                     "streams from its on-disk cache; 0: always resident")

    def __post_init__(self) -> None:
        _validate(self)

    def total_steps(self, num_train: int) -> int:
        """Number of optimisation steps, from ``epochs`` when set, else ``steps``."""
        if self.epochs > 0:
            samples = self.epochs * num_train
            if not math.isfinite(samples):
                raise ConfigError(f"epochs={self.epochs:g} of {num_train} images is too many steps to count; "
                                  "use a smaller epochs")
            return max(1, -(-int(samples) // self.batch_size))
        return self.steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _show_default(value) -> str:
    """A default as it is typed on the command line (tuples as ``a,b``)."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, dict) else str(value)


def describe_fields() -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of every TrainConfig field, in declaration order."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out.append((f.name, str(f.type), _show_default(default), f.metadata.get("help", "")))
    return out


def _non_finite(c: TrainConfig) -> str | None:
    """The message for the first float value (or float in a pair) that is NaN or infinite, else None."""
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        items = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            return f"{f.name} must be finite, got {_show_default(value)}"
    return None


def _too_large_for_float32(c: TrainConfig) -> str | None:
    """The message for the first learning rate (as a parameter group gets it) or weight decay past float32."""
    rates = {"lr": c.lr, "lr x norm_lr_mult": c.lr * c.norm_lr_mult, "lr x backbone_lr_mult": c.lr * c.backbone_lr_mult,
             "lr x norm_lr_mult x backbone_lr_mult": c.lr * c.norm_lr_mult * c.backbone_lr_mult,
             "weight_decay": c.weight_decay}
    if c.optimizer == "muon":
        rates.update({"muon_lr": c.muon_lr, "muon_lr x backbone_lr_mult": c.muon_lr * c.backbone_lr_mult})
    for what, v in rates.items():
        if v > FLOAT32_MAX:
            return f"{what} is {v:g}, more than a float32 holds ({FLOAT32_MAX:.4g}); use a smaller value"
    return None


def _non_negative(c: TrainConfig, *keys: str) -> list[tuple[bool, str]]:
    """One check per key, ``value >= 0``, each message naming only its own key and value."""
    return [(getattr(c, k) >= 0, f"{k} must be >= 0, got {getattr(c, k)}") for k in keys]


def _positive(c: TrainConfig, *keys: str) -> list[tuple[bool, str]]:
    """One check per key, ``value > 0``, each message naming only its own key and value."""
    return [(getattr(c, k) > 0, f"{k} must be > 0, got {getattr(c, k)}") for k in keys]


def _validate(c: TrainConfig) -> None:
    """Check value ranges; raise ConfigError on the first bad one."""
    non_finite = _non_finite(c)  # first: NaN fails every range check below with a less direct message
    if non_finite:
        raise ConfigError(non_finite)
    checks = [
        *_positive(c, "lr", "batch_size", "steps"),
        *_non_negative(c, "epochs"),
        (c.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {c.optimizer!r}"),
        (c.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {c.schedule!r}"),
        (c.tta in TTA_MODES, f"tta must be one of {', '.join(TTA_MODES)}, got {c.tta!r}"),
        (c.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {c.precision!r}"),
        (0 <= c.momentum < 1, f"momentum must be in [0, 1), got {c.momentum}"),
        *_positive(c, "norm_lr_mult", "muon_lr"),
        (0 <= c.muon_momentum < 1, f"muon_momentum must be in [0, 1), got {c.muon_momentum}"),
        (c.optimizer == "muon" or not c.muon_norm, "muon_norm needs optimizer = muon"),
        *_non_negative(c, "weight_decay"),
        (0 <= c.warmup < 1, f"warmup must be in [0, 1), got {c.warmup}"),
        (0 <= c.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {c.label_smoothing}"),
        (0 <= c.ema < 1, f"ema must be in [0, 1), got {c.ema}"),
        *_non_negative(c, "translate", "cutout"),
        (c.flip or not c.alternate_flip, "alternate_flip needs flip = true"),
        (0 <= c.hue <= 0.5, f"hue must be in [0, 0.5], got {c.hue}"),
        (c.random_resized_crop == (0.0, 0.0) or 0 < c.random_resized_crop[0] <= c.random_resized_crop[1] <= 1,
         "random_resized_crop must be (0, 0) or (lower, upper) with 0 < lower <= upper <= 1, "
         f"got {c.random_resized_crop}"),
        *_non_negative(c, "data_memory_gb", "brightness"),
        (0 <= c.contrast[0] <= c.contrast[1],
         f"contrast must be (lower, upper) with 0 <= lower <= upper, got {c.contrast}"),
        (0 <= c.saturation[0] <= c.saturation[1],
         f"saturation must be (lower, upper) with 0 <= lower <= upper, got {c.saturation}"),
        *_positive(c, "log_every", "ckpt_every"),
        (c.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {c.keep_checkpoints}"),
        *_non_negative(c, "eval_every"),
        *_positive(c, "eval_batch_size"),
        *_non_negative(c, "log_probs", "threads"),
        (0 <= c.seed <= MAX_SEED, f"seed must be in [0, 2**63 - 1], got {c.seed}"),
        (c.select_metric in SELECT_METRICS,
         f"select_metric must be one of {', '.join(SELECT_METRICS)}, got {c.select_metric!r}"),
        *_non_negative(c, "patience", "min_delta"),
        (c.patience == 0 or c.eval_every > 0, "patience needs eval_every > 0 (early stopping counts evaluations)"),
        (c.class_weights in CLASS_WEIGHTS,
         f"class_weights must be one of {', '.join(CLASS_WEIGHTS)}, got {c.class_weights!r}"),
        (c.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}, got {c.sampler!r}"),
        (c.class_weights == "none" or c.sampler == "shuffle",
         "use class_weights=balanced or sampler=balanced, not both (each alone corrects the imbalance)"),
        *_non_negative(c, "clip_grad_norm"),
        (1 <= c.accumulate <= c.batch_size,
         f"accumulate must be in [1, batch_size={c.batch_size}], got {c.accumulate}"),
        *_non_negative(c, "mixup", "cutmix", "freeze_steps", "freeze_epochs"),
        (not (c.freeze_steps and c.freeze_epochs), "set freeze_steps or freeze_epochs, not both"),
        *_positive(c, "backbone_lr_mult"),
        (c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"),
         f"device must be auto, cpu or cuda[:N], got {c.device!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    too_large = _too_large_for_float32(c)
    if too_large:
        raise ConfigError(too_large)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _hints() -> dict:
    return typing.get_type_hints(TrainConfig)


def _coerce(key: str, value, hint):
    """Convert ``value`` (from TOML or a command-line string) to the field's type, or raise ConfigError."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer past float's range (a TOML 1 followed by 400 zeros)
                raise ConfigError(f"bad value for {key}: an integer too large for a float") from None
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        args = typing.get_args(hint)
        if isinstance(items, (list, tuple)) and len(items) == len(args):
            return tuple(_coerce(key, v, a) for v, a in zip(items, args))
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif origin in (typing.Union, types.UnionType):
        return _coerce(key, value, typing.get_args(hint)[0])
    raise ConfigError(f"bad value for {key}: {value!r} is not a valid {getattr(hint, '__name__', hint)}")


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_FIELDS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _parse_scalar(text: str):
    """Parse a model_args value typed on the command line: TOML literal if it is one, else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def make_config(values: dict) -> TrainConfig:
    """Build a TrainConfig from a mapping, rejecting unknown keys and converting types."""
    hints = _hints()
    out = {}
    for key, value in values.items():
        if key not in _FIELDS:
            raise _unknown_key(key)
        out[key] = _coerce(key, value, hints[key])
    return TrainConfig(**out)


def parse_overrides(items: list[str]) -> dict:
    """Turn ``['--lr=0.01', '--batch-size', '64', 'model_args.dropout=0.3']`` into a dict of raw values.

    Dashes in keys become underscores. ``model_args.NAME=VALUE`` sets one model argument.
    """
    out: dict = {}
    i = 0
    while i < len(items):
        item = items[i].removeprefix("--")
        if "=" in item:
            key, value = item.split("=", 1)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            key, value = item, items[i + 1]
            i += 1
        elif item.startswith("no-"):
            key, value = item[3:], "false"
        else:
            key, value = item, "true"
        key = key.replace("-", "_")
        if key.startswith("model_args."):
            out.setdefault("model_args", {})[key.split(".", 1)[1]] = _parse_scalar(value)
        else:
            if key not in _FIELDS:
                raise _unknown_key(key)
            out[key] = value
        i += 1
    return out


@dataclass(frozen=True)
class Recipe:
    """A named training setup: its config values and, where it reproduces a tutorial, the reported result."""

    name: str
    description: str
    values: dict
    reference: dict  # {'accuracy': 0.973, 'steps': 20000, 'source': '...', 'bench_steps': ...}


def _recipe_dir():
    return resources.files("cnnlab") / "recipes"


def list_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in _recipe_dir().iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str) -> Recipe:
    """Load a recipe by name (bundled) or from a TOML file path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {name_or_path}")
        try:
            text, name = path.read_text(encoding="utf-8"), path.stem
        except UnicodeDecodeError as e:
            raise ConfigError(f"recipe {name_or_path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                              f"{e.start}); TOML files are UTF-8") from None
        except OSError as e:
            raise ConfigError(f"cannot read recipe {name_or_path}: {e.strerror or e}") from None
    else:
        res = _recipe_dir() / f"{name_or_path}.toml"
        if not res.is_file():
            close = difflib.get_close_matches(name_or_path, list_recipes(), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown recipe {name_or_path!r}{hint}; known recipes: {', '.join(list_recipes())}")
        text, name = res.read_text(encoding="utf-8"), name_or_path
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {name_or_path}: invalid TOML: {e}") from None
    description = data.pop("description", "")
    reference = data.pop("reference", {})
    make_config(data)  # validate now, so a bad recipe fails before any work
    return Recipe(name=name, description=description, values=data, reference=reference)


def resolve_config(recipe: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Recipe values (if any), then overrides; ``model_args`` tables are merged key by key."""
    values = dict(load_recipe(recipe).values) if recipe else {}
    for key, value in (overrides or {}).items():
        if key == "model_args":
            values["model_args"] = {**values.get("model_args", {}), **value}
        else:
            values[key] = value
    return make_config(values)
