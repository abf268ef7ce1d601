"""Plain building blocks of training: optimiser, schedule, batch order, one step.

Devices, precision, prediction and evaluation are `cnnlab.infer`'s (the loop evaluates as inference does).

For people who write their own loop::

    model = create_model("lenet5")
    opt = make_optimizer(TrainConfig(optimizer="sgd", lr=0.01), model)
    for x, y in my_batches:
        loss, logits = train_step(model, opt, x, y)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..infer import autocast
from .finetune import param_groups
from .muon import Muon, muon_groups


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser a config names. Weight decay skips biases and norm parameters (1-D tensors); the backbone's
    groups carry ``lr_mult`` = ``backbone_lr_mult`` (see `finetune.param_groups`); "muon" moves the convolution
    filters to groups of their own (`muon.muon_groups`). Without ``config.compile``, it is the optimiser class's
    `eager_optimizer` subclass (same updates and state, no torch._dynamo import)."""
    groups = param_groups(model, config)
    kind = (lambda cls: cls) if config.compile else eager_optimizer
    sgd, adam, adamw = kind(torch.optim.SGD), kind(torch.optim.Adam), kind(torch.optim.AdamW)
    builders = {
        "sgd": lambda: sgd(groups, lr=config.lr),
        "momentum": lambda: sgd(groups, lr=config.lr, momentum=config.momentum),
        "nesterov": lambda: sgd(groups, lr=config.lr, momentum=config.momentum, nesterov=True),
        "adam": lambda: adam(groups, lr=config.lr, eps=config.adam_eps),
        "adamw": lambda: adamw(groups, lr=config.lr, eps=config.adam_eps),
        "muon": lambda: kind(Muon)(muon_groups(groups, config), lr=config.lr, momentum=config.momentum),
    }
    return builders[config.optimizer]()


# Optimizer methods that torch wraps for torch.compile (`torch._disable_dynamo`, plus a graph break around `step`)
_COMPILE_WRAPPED = ("zero_grad", "add_param_group", "state_dict", "load_state_dict")


@functools.cache
def eager_optimizer(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls``'s subclass for a process that does not compile its optimiser step: its methods skip torch's
    torch.compile wrappers.

    Those wrappers import torch._dynamo (and with it sympy, triton and much of torch.distributed) at the first
    call of `step`, `zero_grad` or the constructor: the largest import of a training command, paid before its
    first step (measured in docs/speed.md). Outside torch.compile the wrappers only call the method (and
    `step`'s sets the grad mode, as here), so the updates, the state dict and its loading are the same (tested
    against the plain class).
    """
    raw_step = inspect.unwrap(cls.step)  # under the profiler hook and the grad-mode / graph-break wrapper

    def step(self, closure=None):
        previous = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(self.defaults.get("differentiable", False))
            return raw_step(self, closure)
        finally:
            torch.set_grad_enabled(previous)

    methods = {name: inspect.unwrap(getattr(cls, name)) for name in _COMPILE_WRAPPED}
    return type(cls.__name__, (cls,), {"step": step, **methods, "__module__": __name__,
                                       "__qualname__": f"eager_optimizer({cls.__qualname__})",
                                       "__doc__": cls.__doc__})


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


# Each kind of draw has its own stream, the (multiplier, offset) of its generators' seeds: the batch order, the
# augmentation and the balanced sampler do not draw from one shared sequence, so a new kind of draw leaves the
# others as they were. Changing a stream changes the draws of every run (and what a resumed run would see).
BATCH_ORDER = (1, 0)
AUGMENT = (7919, 17)
BALANCED_SAMPLER = (104_729, 3)
ALTERNATE_FLIP = (15_485_863, 5)


def seeded_generator(seed: int, index: int, stream: tuple[int, int]) -> torch.Generator:
    """A CPU generator that is a function of (seed, index) only: the draws of epoch or step ``index`` in
    ``stream`` (`BATCH_ORDER`, `AUGMENT` or `BALANCED_SAMPLER`)."""
    mult, offset = stream
    # Reduced to the 64 bits a generator's seed holds (a large config seed would overflow it). Every value that
    # fitted before is unchanged, so runs seeded before this reduction draw the same numbers.
    return torch.Generator().manual_seed(((seed * 1_000_003 + index) * mult + offset) % 2**64)


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
            g = seeded_generator(self.seed, epoch, BATCH_ORDER)
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


class AlternatingFlip:
    """Which samples of batch ``step`` are mirrored under airbench's alternating flip: image i in epoch e when
    its fixed random bit (a function of the seed) differs from e's parity. So each image is seen both ways in
    any two consecutive epochs, where random flips show half of them the same way twice.

    The epoch of a sample is its position in the run's stream of samples divided by the training set's size.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.first = torch.randint(0, 2, (n,), generator=seeded_generator(seed, 0, ALTERNATE_FLIP)).bool()

    def mask(self, idx: torch.Tensor, step: int) -> torch.Tensor:
        """[len(idx)] bool: mirror sample j of the batch (``idx``: the batch's indices into the training set)."""
        odd = ((step * self.batch_size + torch.arange(len(idx))) // self.n) % 2 == 1
        return self.first[idx.cpu()] ^ odd


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for a step's augmentation draws: a function of (seed, step) only."""
    return seeded_generator(seed, step, AUGMENT)


def loss_terms(logits: torch.Tensor, y: torch.Tensor, *, weight: torch.Tensor | None = None,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, denominator) of a batch; the mean loss is their ratio.

    Split so that micro-batches (``accumulate``) add their sums and divide by the whole batch's
    denominator, which gives the gradient of the whole batch's mean. The denominator is the batch size, or
    the summed weight of the targets with class weights (as ``F.cross_entropy``'s weighted mean).

    Args:
        logits: [N, K], float.
        y: Class indices [N], or soft targets [N, K] (MixUp/CutMix) whose rows sum to 1.
        weight: Per-class loss weights [K], or None.
        label_smoothing: As ``F.cross_entropy``'s: targets become ``(1 - e) * t + e / K``.
    """
    if y.ndim == 1:
        total = F.cross_entropy(logits, y, weight=weight, label_smoothing=label_smoothing, reduction="sum")
        return total, loss_denominator(y, weight)
    t = y.float()
    smooth = t * (1 - label_smoothing) + label_smoothing / t.shape[1]
    w = weight if weight is not None else torch.ones(t.shape[1], device=logits.device)
    return -(smooth * w * F.log_softmax(logits, 1)).sum(), loss_denominator(y, weight)


def loss_denominator(y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """What a batch's summed loss is divided by: its size, or its targets' summed class weight."""
    if y.ndim == 1:
        return weight[y].sum() if weight is not None else torch.tensor(float(len(y)), device=y.device)
    w = weight if weight is not None else torch.ones(y.shape[1], device=y.device)
    return (y.float() * w).sum()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               label_smoothing: float = 0.0, precision: str = "fp32", class_weight: torch.Tensor | None = None,
               clip_grad_norm: float = 0.0, accumulate: int = 1,
               scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch. Returns (mean loss, logits), both detached.

    Args:
        model, optimizer: What to train.
        x: Images [N, C, H, W].
        y: Class indices [N], or soft targets [N, K] (MixUp/CutMix).
        label_smoothing: As ``F.cross_entropy``'s.
        precision: fp32, bf16 or fp16 (autocast; fp16 wants ``scaler``).
        class_weight: Per-class loss weights [K], or None.
        clip_grad_norm: Clip the global gradient norm to this (0: off).
        accumulate: Split the batch into this many micro-batches and sum their gradients: the step is the
            one of the whole batch (exactly, for models without batch statistics or dropout), with the
            activation memory of a micro-batch.
        scaler: A `torch.amp.GradScaler` (fp16); gradients are unscaled before clipping.
    """
    optimizer.zero_grad(set_to_none=True)
    kw = {"weight": class_weight, "label_smoothing": label_smoothing}
    xs, ys = x.chunk(accumulate), y.chunk(accumulate)
    denom = loss_denominator(y, class_weight)  # the whole batch's, shared by its micro-batches
    losses, outs = [], []
    for i, (xc, yc) in enumerate(zip(xs, ys)):
        last = i == len(xs) - 1
        # DDP: reduce gradients once, after the last micro-batch
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(x.device, precision):
                logits = model(xc)
                if accumulate == 1 and yc.ndim == 1:  # the plain mean, as before accumulation existed
                    loss = F.cross_entropy(logits.float(), yc, **kw)
                else:
                    loss = loss_terms(logits.float(), yc, **kw)[0] / denom
            (scaler.scale(loss) if scaler is not None else loss).backward()
        losses.append(loss.detach())
        outs.append(logits.detach())
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if clip_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    return torch.stack(losses).sum(), torch.cat(outs)
