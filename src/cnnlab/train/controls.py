"""Training controls the loop calls: best checkpoint and early stopping, class balance, MixUp/CutMix, fp16.

Each control is off by default and is a small function or class here, so the loop stays readable:

* **Best checkpoint** (``select_metric``): `Evaluator` validates every ``eval_every`` steps; after every
  evaluation that improves the metric by more than ``min_delta``, the weights are written to
  ``best.safetensors`` beside the ``ckpt-*`` files. Its name does not match theirs, so ``keep_checkpoints``
  never prunes it and resume never starts from it. `cnnlab.checkpoint.choose_checkpoint` picks what
  ``evaluate``, ``export`` and ``serve`` load: the best when there is one.
* **Early stopping** (``patience``): stop after that many evaluations without improvement. The count is
  derived from the best checkpoint's step, so a resumed run stops where the uninterrupted one would.
* **Class balance**: ``class_weights="balanced"`` (loss weights ``n / (K * count)``, as scikit-learn's) or
  ``sampler="balanced"`` (every class drawn equally often; batch ``step`` a function of (seed, step)).
* **MixUp / CutMix**: per-sample mixing drawn from the step's generator (resume stays bit-identical); the
  loss takes the mixed soft targets.
* **fp16**: autocast in float16 with a `torch.amp.GradScaler`, for CUDA GPUs without bf16. Not measured on a
  GPU here; on CPU it is refused (bf16 is the CPU's reduced precision).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import checkpoint as ck
from ..checkpoint import BEST_NAME
from ..config import TrainConfig
from ..errors import ConfigError
from .steps import BALANCED_SAMPLER, EpochSampler, seeded_generator

if TYPE_CHECKING:  # annotations only: evaluation itself goes through the DistContext
    from ..data import ArrayDataset
    from ..infer import EvalResult
    from .distributed import DistContext

# ------------------------------------------------------------------ best checkpoint and early stopping


@dataclass
class Selection:
    """Tracks the best evaluation of ``metric`` and decides when training stops early.

    Attributes:
        metric: ``val_accuracy`` (higher is better) or ``val_loss`` (lower is better).
        patience: Evaluations without improvement before stopping (0: never stop early).
        min_delta: An improvement must beat the best by more than this.
        eval_every: Steps between evaluations (evaluations happen at its multiples).
        best_value: Best value so far (None before the first evaluation).
        best_step: Step of the best value.
    """

    metric: str
    patience: int
    min_delta: float
    eval_every: int
    best_value: float | None = None
    best_step: int = 0

    @classmethod
    def from_config(cls, config: TrainConfig) -> Selection:
        return cls(config.select_metric, config.patience, config.min_delta, config.eval_every)

    @property
    def enabled(self) -> bool:
        return self.eval_every > 0

    def value(self, result: dict) -> float:
        """The metric in an evaluation result ({'accuracy', 'loss', ...})."""
        return float(result[self.metric.removeprefix("val_")])

    def is_better(self, value: float) -> bool:
        if self.best_value is None:
            return not math.isnan(value)  # a NaN never becomes the best
        if self.metric.endswith("loss"):
            return value < self.best_value - self.min_delta
        return value > self.best_value + self.min_delta

    def update(self, result: dict, step: int) -> bool:
        """Record the evaluation at ``step``; True when it is a new best (the caller saves the weights).

        An evaluation at or before the best's step was seen before an interruption (the best file can be
        newer than the checkpoint resumed from); the rerun reproduces it, so it is not counted twice.
        """
        if step <= self.best_step and self.best_value is not None:
            return False
        value = self.value(result)
        if not self.is_better(value):
            return False
        self.best_value, self.best_step = value, step
        return True

    def evals_since_best(self, step: int) -> int:
        """Evaluations after the best one, up to ``step`` (evaluations fall on multiples of eval_every)."""
        if self.best_value is None or step <= self.best_step:
            return 0
        return step // self.eval_every - self.best_step // self.eval_every

    def should_stop(self, step: int) -> bool:
        return self.patience > 0 and self.evals_since_best(step) >= self.patience

    def restore(self, model_dir: Path, step: int) -> None:
        """Take up the best of a run being resumed (from ``best.safetensors``'s header).

        A fresh run (``step == 0``) removes a best file left by an earlier run in the same directory, as it
        truncates the metrics log. A best chosen by another metric is not comparable and is dropped.
        """
        path = Path(model_dir) / BEST_NAME
        if step == 0:
            path.unlink(missing_ok=True)
            return
        if not path.is_file():
            return
        _, meta = ck.load_checkpoint(path)
        best = meta.get("extra", {}).get("best", {})
        if best.get("metric") == self.metric:
            self.best_value, self.best_step = best["value"], best["step"]

    def stop_message(self, step: int) -> str:
        return (f"early stop at step {step}: {self.metric} did not improve for {self.patience} evaluations "
                f"(best {self.best_value:.4f} at step {self.best_step})")

    def record(self) -> dict:
        """What to store in the best checkpoint's header and in results.json."""
        return {"metric": self.metric, "value": self.best_value, "step": self.best_step}


def resume_selection(config: TrainConfig, model_dir: Path, step: int, is_main: bool) -> Selection:
    """The run's `Selection`, taken up from its best checkpoint when resuming.

    At step 0 only the main process touches the directory (it removes an old best file); at a later step
    every process reads the same file, so they agree on when to stop.
    """
    selection = Selection.from_config(config)
    if is_main or step:
        selection.restore(model_dir, step)
    return selection


def save_best(model_dir: Path, model: torch.nn.Module, ema: torch.nn.Module | None, step: int, config: dict,
              data: dict, selection: Selection) -> None:
    """Write ``best.safetensors``: weights (and EMA) only, as resume starts from the newest ``ckpt-*``."""
    ck.save_checkpoint(Path(model_dir) / BEST_NAME, model=model, optimizer=None, step=step, config=config,
                       data=data, ema=ema, extra={"best": selection.record()})


def results_record(selection: Selection, step: int, total: int) -> dict:
    """The best evaluation and whether training stopped early, for results.json (empty without evaluations)."""
    return {"best": selection.record(), "stopped_early": step < total} if selection.enabled else {}


@dataclass
class Evaluator:
    """The run's evaluations: the validation split during training, which picks ``best.safetensors`` and
    decides an early stop (through ``selection``), and the test split once at the end.

    Attributes:
        val_set: Evaluated every ``eval_every`` steps (the test split itself when there is no other).
        test_set: Evaluated at the end.
        selection: Tracks the best evaluation and decides an early stop.
        eval_every: Steps between validations (0: the test split at the end only).
        dist: This process's place in a data-parallel run.
        emit: Called with every eval record.
        save_best: Writes ``best.safetensors`` (called after an evaluation that improved).
        eval_kw: Keyword arguments of `distributed.DistContext.evaluate` (batch size, TTA, precision, crop...).
        last: The step and result of the latest validation ((-1, None) before the first).
    """

    val_set: ArrayDataset
    test_set: ArrayDataset
    selection: Selection
    eval_every: int
    dist: DistContext
    emit: Callable[[dict], object]
    save_best: Callable[[], None]
    eval_kw: dict
    last: tuple[int, EvalResult | None] = (-1, None)

    @classmethod
    def for_run(cls, config: TrainConfig, crop: tuple[int, int] | None, val_set: ArrayDataset,
                test_set: ArrayDataset, selection: Selection, dist: DistContext, emit: Callable[[dict], object],
                save_best: Callable[[], None]) -> Evaluator:
        """The evaluations of a run, with the settings it records (batch size, TTA, precision, layout and
        ``crop``, the centre crop of its preprocessing)."""
        eval_kw = dict(batch_size=config.eval_batch_size, tta=config.tta, device=dist.device,
                       precision=config.precision, channels_last=config.channels_last, crop=crop)
        return cls(val_set, test_set, selection, config.eval_every, dist, emit, save_best, eval_kw)

    @property
    def separate(self) -> bool:
        """Whether the validation split is another split than the test split."""
        return self.val_set is not self.test_set

    def should_stop(self, step: int) -> bool:
        """Whether training stops early before step ``step`` (patience run out)."""
        return self.selection.should_stop(step)

    def due(self, step: int, total: int) -> bool:
        """Whether to validate after step ``step`` (1-based) of ``total``."""
        # at the last step the test evaluation (`finish`) doubles as the validation when they are one split
        return bool(self.eval_every) and (step % self.eval_every == 0 or step == total) \
            and (step < total or self.separate)

    def _evaluate(self, model: torch.nn.Module, split: ArrayDataset) -> EvalResult:
        return self.dist.evaluate(model, split.images, split.labels, **self.eval_kw)

    def _select(self, result: EvalResult, step: int) -> None:
        if self.selection.update(result.as_dict(), step):
            self.save_best()

    def validate(self, model: torch.nn.Module, step: int) -> None:
        """Evaluate ``model`` on the validation split after ``step``; save it as the best if it improved."""
        result = self._evaluate(model, self.val_set)
        self.last = (step, result)
        self.emit({"kind": "eval", "split": self.val_set.split, "step": step, **result.as_dict()})
        self._select(result, step)

    def finish(self, model: torch.nn.Module, step: int) -> tuple[EvalResult, EvalResult | None]:
        """The final weights' results: on the test split, and on a separate validation split (else None).

        A validation just done at ``step`` is not repeated; when the test split is the validation split, its
        evaluation here also counts for the best checkpoint.
        """
        fresh = self.last[1] if self.last[0] == step else None
        if not self.separate and fresh is not None:  # stopped right after evaluating the test split
            return fresh, None
        val = None
        if self.separate:  # the final weights on the validation split, beside the test figure
            val = fresh if fresh is not None else self._evaluate(model, self.val_set)
        test = self._evaluate(model, self.test_set)
        self.emit({"kind": "eval", "split": "test", "step": step, **test.as_dict()})
        if self.eval_every and not self.separate:
            self._select(test, step)
        return test, val

    def best_on_test(self, model: torch.nn.Module, step: int, test: EvalResult,
                     load_best: Callable[[torch.nn.Module], bool]) -> tuple[int, EvalResult] | None:
        """(step, test result) of the weights in ``best.safetensors``, the ones evaluate, predict, export and
        serve use; None when no evaluation picked a best.

        The final weights' ``test`` when the best is the last step; otherwise a copy of ``model`` takes the best
        weights (``load_best``) and is evaluated on the test split, so the run reports what it will serve.
        """
        best = self.selection.best_step
        if not self.selection.enabled or self.selection.best_value is None:
            return None
        if best == step:
            return best, test
        twin = copy.deepcopy(model)
        if not load_best(twin):
            return None
        return best, self._evaluate(twin, self.test_set)  # results.json holds it; the metrics log stays in step order


# ------------------------------------------------------------------ class balance


def class_counts(labels: torch.Tensor, num_classes: int = 0) -> torch.Tensor:
    """Images per class, on the CPU: ``num_classes`` entries (0: up to the largest label present)."""
    return torch.bincount(labels.long().cpu(), minlength=num_classes)


def class_weights(labels: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor | None:
    """Loss weights per class: ``n / (K * count)`` for ``balanced`` (1 for every class when balanced already).

    A class with no training images gets weight 0: it is never a target, and a finite weight keeps the
    label-smoothing term finite.
    """
    if mode == "none":
        return None
    counts = class_counts(labels, num_classes).double()
    w = torch.where(counts > 0, len(labels) / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w.float()


class BalancedSampler:
    """Batch ``step`` drawn with replacement so that every class present is equally likely.

    Like `EpochSampler`, the indices are a function of (seed, step) only, so a resumed run sees exactly the
    batches it would have seen.
    """

    def __init__(self, labels: torch.Tensor, batch_size: int, seed: int):
        counts = class_counts(labels)
        self.weights = 1.0 / counts[labels.long().cpu()].double()  # each class's total weight is 1
        self.batch_size, self.seed = batch_size, seed

    def indices(self, step: int) -> torch.Tensor:
        g = seeded_generator(self.seed, step, BALANCED_SAMPLER)
        return torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)


def make_sampler(config: TrainConfig, labels: torch.Tensor):
    """The batch-order sampler a config asks for (`EpochSampler` or `BalancedSampler`)."""
    if config.sampler == "balanced":
        return BalancedSampler(labels, config.batch_size, config.seed)
    return EpochSampler(len(labels), config.batch_size, config.seed)


# ------------------------------------------------------------------ MixUp / CutMix


def _beta(alpha: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """n draws of Beta(alpha, alpha), a function of ``gen``'s state alone.

    torch's Beta sampler takes no generator, so it runs on the global RNG seeded from ``gen``, inside
    ``fork_rng`` so that the global stream (dropout draws) is left as it was.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.distributions.Beta(float(alpha), float(alpha)).sample((n,)).float()


def _box_masks(lam: torch.Tensor, h: int, w: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix boxes covering about ``1 - lam`` of each image: masks [N,1,H,W] (True inside) and exact lam."""
    n = len(lam)
    cut = (1 - lam).sqrt()
    bh, bw = (cut * h).long(), (cut * w).long()
    cy = (torch.rand(n, generator=gen) * h).long()
    cx = (torch.rand(n, generator=gen) * w).long()
    top, bottom = (cy - bh // 2).clamp(0, h), (cy + bh - bh // 2).clamp(0, h)
    left, right = (cx - bw // 2).clamp(0, w), (cx + bw - bw // 2).clamp(0, w)
    rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < bottom[:, None, None])
              & (cols >= left[:, None, None]) & (cols < right[:, None, None]))
    area = ((bottom - top) * (right - left)).float()
    return inside[:, None], 1 - area / (h * w)


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, gen: torch.Generator, *,
              mixup: float = 0.0, cutmix: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp and/or CutMix each sample with another of the batch; returns (images, soft targets [N, K]).

    Every draw comes from ``gen`` (the step's generator), so the result is a function of (seed, step).
    With both on, each sample is mixed one way or the other with probability 1/2 (as timm's switch).

    Args:
        x: Images [N, C, H, W], float.
        y: Class indices [N].
        num_classes: K, the width of the targets.
        gen: CPU generator of the step.
        mixup, cutmix: Beta(alpha, alpha) parameters; 0 turns that kind off.
    """
    n, _, h, w = x.shape
    partner = torch.randperm(n, generator=gen)
    lam = torch.ones(n)
    use_cut = torch.zeros(n, dtype=torch.bool)
    if mixup > 0:
        lam = _beta(mixup, n, gen)
    if cutmix > 0:
        cut_lam = _beta(cutmix, n, gen)
        use_cut = torch.rand(n, generator=gen) < 0.5 if mixup > 0 else torch.ones(n, dtype=torch.bool)
        inside, cut_lam = _box_masks(cut_lam, h, w, gen)
        lam = torch.where(use_cut, cut_lam, lam)
        inside = inside & use_cut[:, None, None, None]
    dev = x.device
    partner, lam = partner.to(dev), lam.to(dev, x.dtype)
    other = x[partner]
    lam4 = lam[:, None, None, None]
    mixed = torch.where(use_cut.to(dev)[:, None, None, None], x, lam4 * x + (1 - lam4) * other)
    if cutmix > 0:
        mixed = torch.where(inside.to(dev), other, mixed)  # CutMix: the partner's pixels inside the box
    onehot = F.one_hot(y.long(), num_classes).float()
    targets = lam[:, None] * onehot + (1 - lam[:, None]) * onehot[partner]
    return mixed, targets


# ------------------------------------------------------------------ precision


def check_precision(precision: str, device: torch.device) -> None:
    """fp16 is for CUDA devices (with a GradScaler); refuse it elsewhere in one line."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 needs a CUDA device; use bf16 on CPU")


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (disabled, it passes losses and steps through unchanged)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def scaler_state(scaler: torch.amp.GradScaler | None) -> dict:
    """The scaler's state as JSON-able values for the checkpoint header (empty when disabled)."""
    if scaler is None or not scaler.is_enabled():
        return {}
    return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in scaler.state_dict().items()}


def restore_scaler(scaler: torch.amp.GradScaler | None, meta: dict) -> None:
    """Restore the loss scale saved by `scaler_state` so a resumed fp16 run scales as the original did."""
    state = meta.get("extra", {}).get("grad_scaler")
    if scaler is not None and scaler.is_enabled() and state:
        scaler.load_state_dict(state)
