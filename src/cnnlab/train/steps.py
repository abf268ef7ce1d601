"""Plain building blocks of training: device, optimiser, schedule, batch order, one step, evaluation.

For people who write their own loop::

    model = create_model("lenet5")
    opt = make_optimizer(TrainConfig(optimizer="sgd", lr=0.01), model)
    for x, y in my_batches:
        loss, logits = train_step(model, opt, x, y)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..data.augment import fit_to_size
from ..errors import ConfigError
from .finetune import param_groups


def select_device(spec: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cuda' without a GPU is a ConfigError."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but no CUDA GPU is available")
    return torch.device(spec)


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser a config names. Weight decay skips biases and norm parameters (1-D tensors); the backbone's
    groups carry ``lr_mult`` = ``backbone_lr_mult`` (see `finetune.param_groups`)."""
    groups = param_groups(model, config)
    builders = {
        "sgd": lambda: torch.optim.SGD(groups, lr=config.lr),
        "momentum": lambda: torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum),
        "nesterov": lambda: torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True),
        "adam": lambda: torch.optim.Adam(groups, lr=config.lr, eps=config.adam_eps),
        "adamw": lambda: torch.optim.AdamW(groups, lr=config.lr, eps=config.adam_eps),
    }
    return builders[config.optimizer]()


def lr_factor(schedule: str, step: int, total: int, warmup: float) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``total``.

    constant: 1. linear: 1 -> 0. cosine: linear warm-up over ``warmup * total`` steps, then half a cosine
    to 0. onecycle: linear 0 -> 1 over the warm-up, then 1 -> 0. triangle (airbench): 0.2 -> 1 -> 0.
    """
    t = step / max(1, total)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - t
    peak = warmup
    if peak > 0 and t < peak:
        return (t / peak) if schedule != "triangle" else 0.2 + 0.8 * t / peak
    rest = (t - peak) / max(1e-12, 1 - peak)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * rest))
    return 1.0 - rest  # onecycle and triangle fall linearly to 0


class EpochSampler:
    """Batch ``step`` of a run as indices into the training set: shuffled epochs, batches spanning epoch
    boundaries (tf.estimator's ``numpy_input_fn(shuffle=True, num_epochs=None)``).

    The order depends only on (seed, step), so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep memory bounded
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        start = step * self.batch_size
        parts, pos = [], start
        while pos < start + self.batch_size:
            epoch, off = divmod(pos, self.n)
            take = min(self.n - off, start + self.batch_size - pos)
            parts.append(self._perm(epoch)[off:off + take])
            pos += take
        return torch.cat(parts)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for a step's augmentation draws: a function of (seed, step) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7919 + 17)


def autocast(device: torch.device, precision: str):
    """bf16 autocast context when asked for, else a no-op."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               label_smoothing: float = 0.0, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch. Returns (mean loss, logits), both detached."""
    with autocast(x.device, precision):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def to_input(images_u8: torch.Tensor, input_size: tuple[int, int, int], channels_last: bool = False) -> torch.Tensor:
    """uint8 [N,C,H,W] -> float [0,1] fitted (centre crop / pad) to the model's (C,H,W)."""
    x = fit_to_size(images_u8.float().div_(255.0), tuple(input_size[1:]))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    n: int
    logits: torch.Tensor  # [N, num_classes], on CPU

    def as_dict(self) -> dict:
        return {"loss": self.loss, "accuracy": self.accuracy, "n": self.n}


def _tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views whose logits are averaged: the image, its mirror and/or 1-pixel shifts (airbench's TTA)."""
    views = [x]
    if mode in ("flip", "flip-translate"):
        views.append(x.flip(-1))
    if mode in ("translate", "flip-translate"):
        for v in list(views):
            views.append(F.pad(v, (1, 0, 1, 0), mode="replicate")[..., :-1, :-1])  # shift right/down by 1
            views.append(F.pad(v, (0, 1, 0, 1), mode="replicate")[..., 1:, 1:])  # shift left/up by 1
    return views


@torch.no_grad()
def predict_logits(model: nn.Module, images_u8: torch.Tensor, *, batch_size: int = 1000, tta: str = "none",
                   device: torch.device | None = None, precision: str = "fp32",
                   channels_last: bool = False) -> torch.Tensor:
    """Logits for uint8 images [N,C,H,W] (any size; fitted to the model input), in eval mode, on CPU."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = to_input(images_u8[i:i + batch_size].to(device), model.meta.input_size, channels_last)
        with autocast(device, precision):
            views = _tta_views(x, tta)
            logits = sum(model(v).float() for v in views) / len(views)
        out.append(logits.cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.meta.num_classes)


def evaluate(model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, **kw) -> EvalResult:
    """Accuracy and mean cross-entropy of ``model`` on a labelled set (keywords as `predict_logits`)."""
    logits = predict_logits(model, images_u8, **kw)
    labels = labels.cpu()
    loss = F.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    acc = (logits.argmax(1) == labels).float().mean().item() if len(labels) else float("nan")
    return EvalResult(loss=loss, accuracy=acc, n=len(labels), logits=logits)
