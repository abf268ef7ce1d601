"""Plain building blocks of training: optimiser, schedule, batch order, one step.

Devices, precision, prediction and evaluation are `cnnlab.infer`'s (the loop evaluates as inference does).

For people who write their own loop::

    model = create_model("lenet5")
    opt = make_optimizer(TrainConfig(optimizer="sgd", lr=0.01), model)
    for x, y in my_batches:
        loss, logits = train_step(model, opt, x, y)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..infer import autocast
from .finetune import param_groups


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
