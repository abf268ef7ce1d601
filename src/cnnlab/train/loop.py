"""The training loop: plain code, top to bottom. Resumes from the newest checkpoint in the model directory.

`_fit` reads as the steps of a run: load the data, `prepare_model`, `resume`, `write_run_record`, then
`train_loop` (the loop itself) and `write_results`. Each pass of `train_loop` is `optimise_step` (batch, lr,
forward/backward, EMA), a log line and checkpoint when due, and a validation by the run's
`controls.Evaluator`, which also picks the best checkpoint, stops early and evaluates the test split at the end.

An interrupted run (even SIGKILL) that is started again with the same command continues from its last
checkpoint and ends with the same weights as an uninterrupted run: batch order and augmentation draws are
functions of (seed, step), and the optimiser, step and RNG state come back from the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ck
from .. import rundir
from ..config import TrainConfig
from ..data import ArrayDataset, load_dataset, validation_split
from ..data.augment import Augment
from ..data.folder import absolute_folder, decode_size, sized_for_model
from ..data.loader import BatchSource
from ..errors import CheckpointError, CnnlabError
from ..infer import EvalResult, model_input, select_device
from ..models.layers import pool_before_relu, use_onednn_linear
from ..models.registry import INIT_ONLY_ARGS, check_model_args, create_model, create_model_for_data
from ..preprocess import Preprocess, flexible_size, for_training
from ..runinfo import run_info
from ..runtime import linear_backend, resolve_precision
from . import controls, distributed, finetune
from .hooks import ConsoleLog, MetricsLog, ProgressBar, truncate_metrics
from .steps import AlternatingFlip, EpochSampler, lr_factor, make_optimizer, step_generator, train_step


class TrainingDiverged(CnnlabError):
    """The loss became NaN or infinite."""


@dataclass
class FitResult:
    model: torch.nn.Module  # the model to use (the EMA copy when EMA is on)
    step: int
    test: EvalResult | None
    seconds: float
    model_dir: Path
    best: tuple[int, EvalResult] | None = None  # (step, test result) of best.safetensors' weights, when kept


@dataclass
class TrainState:
    """What a checkpoint holds and the loop advances.

    Attributes:
        model: The model being trained (unwrapped: what is saved and evaluated).
        optimizer: Its optimiser.
        ema: The moving average of the weights, or None when ``config.ema`` is 0.
        step: Optimisation steps done so far.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: torch.nn.Module | None
    step: int = 0
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scale (disabled otherwise)


def build_model(config: TrainConfig, info, resuming: bool = False) -> torch.nn.Module:
    """The model a config names, sized for the dataset (classes, channels; image size for flexible models).

    When ``resuming``, arguments that only choose starting weights (a pretrained file) are not used.
    """
    return create_model_for_data(config.model, info.num_classes, tuple(info.shape), resuming=resuming,
                                 **config.model_args)


def run_preprocess(config: TrainConfig, info, model_meta) -> Preprocess:
    """How the run feeds its model (`cnnlab.preprocess.for_training` with the run's crop settings)."""
    return for_training(info, model_meta, config.random_crop,
                        resized_crop=tuple(config.random_resized_crop) != (0.0, 0.0))


def sized_dataset(config: TrainConfig) -> TrainConfig:
    """``config`` with a ``folder:`` dataset that names no ``size=`` decoded at the model's input size.

    The size is the one the model takes when built without data: a fixed model's input, or for a
    flexible-size model (``timm:...``) its pretrained configuration's (224 for resnet18) unless
    ``img_size`` is given; larger when the run trains on random-resized crops (`decode_size`) and the model's
    size does not follow the data's. The resolved name, with the folder's path made absolute, is what the run
    records, so evaluate and predict use it from any folder.
    """
    dataset = absolute_folder(config.dataset)
    if dataset != config.dataset:
        config = dataclasses.replace(config, dataset=dataset)
    if sized_for_model(config.dataset, (1, 1)) == config.dataset:  # not a folder name, or it has a size
        return config
    check_model_args(config.model, config.model_args)  # before building: the data sets num_classes and in_chans
    args = {k: v for k, v in config.model_args.items() if k not in INIT_ONLY_ARGS}  # no weights needed for a size
    meta = create_model(config.model, **args).meta
    # A flexible model without img_size is built at the data's size, so decoding larger would only make it larger.
    fixed = not flexible_size(meta) or config.model_args.get("img_size") is not None
    resized_crop = fixed and tuple(config.random_resized_crop) != (0.0, 0.0)
    size = decode_size(tuple(meta.input_size[1:]), resized_crop=resized_crop)
    return dataclasses.replace(config, dataset=sized_for_model(config.dataset, size))


def init_from_data(model: torch.nn.Module, images_u8: torch.Tensor, crop: tuple[int, int] | None = None) -> None:
    """Let layers that set themselves from data (e.g. airbench's patch whitening) see some training images.

    Runs on every start; a resumed run then overwrites these weights with the checkpoint's.
    """
    layers = [m for m in model.modules() if hasattr(m, "init_from_data")]
    if layers:
        x = model_input(model, images_u8, crop)
        for layer in layers:
            layer.init_from_data(x)


def prepare_model(config: TrainConfig, train_set: ArrayDataset, device: torch.device,
                  resuming: bool = False) -> tuple[torch.nn.Module, str]:
    """Build the model from the seed, apply the CPU rewrites, initialise from data and set the memory layout.

    Returns:
        The model on ``device`` and the fp32 dense-layer backend it uses ("torch" or "onednn").
    """
    torch.manual_seed(config.seed)  # weights and dropout draws start from the seed
    model = build_model(config, train_set.info, resuming).to(device)
    crop = run_preprocess(config, train_set.info, model.meta).crop  # a size mismatch fails here
    Augment.from_config(config, tuple(model.meta.input_size[1:]))  # so does a translate too large for the input
    pool_before_relu(model)  # same function and gradients, less work; state-dict keys unchanged
    # fp32 dense layers through oneDNN where torch's BLAS is slow (runtime.py); compile and CUDA keep nn.Linear
    fp32_linear = linear_backend() if device.type == "cpu" and not config.compile else "torch"
    use_onednn_linear(model, fp32_linear)
    init_from_data(model, train_set.images[:5000].to(device), crop)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, fp32_linear


def _check_same_run(meta: dict, model: torch.nn.Module, config: TrainConfig, where: Path) -> None:
    """Refuse to resume a checkpoint of another model or dataset: a silent mismatch would corrupt the run."""
    saved = meta["model"]
    if saved["name"] != model.meta.name or saved["args"] != model.meta.args:
        raise CheckpointError(f"{where} holds {saved['name']} {saved['args']}, not {model.meta.name} "
                              f"{model.meta.args}; use another --model-dir")
    # a run recorded before folder paths were made absolute names its folder relative to where it was trained
    if absolute_folder(meta["config"].get("dataset") or "") != absolute_folder(config.dataset):
        raise CheckpointError(f"{where} was trained on {meta['config'].get('dataset')}, not {config.dataset}; "
                              "use another --model-dir")


def resume(state: TrainState, model_dir: Path, config: TrainConfig, dist: distributed.DistContext,
           log: Callable[[str], None]) -> None:
    """Restore ``state`` (weights, optimiser, EMA, RNG, step) from the newest checkpoint in ``model_dir``, if any."""
    if dist.is_main:
        rundir.remove_stale_temps(model_dir)  # partial writes of a killed run; the checkpoints themselves are whole
    last = ck.latest_checkpoint(model_dir)
    if last is not None:
        tensors, meta = ck.load_checkpoint(last)
        _check_same_run(meta, state.model, config, last)
        ck.load_state_strict(state.model, ck.section(tensors, "model"), str(last))
        ck.restore_optimizer(state.optimizer, tensors, meta["optimizer"], str(last))
        if state.ema is not None:
            ema_state = ck.section(tensors, "ema")  # a run that turned EMA on late starts it from the weights
            ck.load_state_strict(state.ema, ema_state or ck.section(tensors, "model"), str(last))
        ck.restore_rng(tensors)
        controls.restore_scaler(state.scaler, meta)
        state.step = meta["step"]
        log(f"resuming from {last.name} (step {state.step})")
        changed = changed_settings(meta.get("config", {}), config.to_dict())
        if changed:  # allowed (e.g. more steps), but config.json is rewritten: say what differs
            log("settings changed since that checkpoint: " + ", ".join(changed))
    dist.check_same(state.step, "step to resume from")


def changed_settings(before: dict, now: dict) -> list[str]:
    """``"key old -> new"`` for each setting that differs between two config dicts (the dataset, checked
    separately, and keys only one side knows are left out)."""
    before, now = json.loads(json.dumps(before)), json.loads(json.dumps(now))  # tuples and lists alike
    return [f"{key} {before[key]!r} -> {now[key]!r}" for key in sorted(before.keys() & now.keys())
            if key != "dataset" and before[key] != now[key]]


def data_record(config: TrainConfig, info, model_meta) -> dict:
    """What the run knows about its data, saved in config.json and in every checkpoint; ``preprocess`` is what
    `cnnlab.infer` prepares inputs with."""
    return {"dataset": config.dataset, "classes": list(info.class_names), "shape": list(info.shape),
            "preprocess": run_preprocess(config, info, model_meta).to_json()}


def write_run_record(model_dir: Path, config: TrainConfig, state: TrainState, data_meta: dict, *, total: int,
                     fp32_linear: str, dist: distributed.DistContext) -> None:
    """Write config.json (the resolved config, model, data and machine) and cut metrics.jsonl back to the step."""
    model = state.model
    record = {"config": config.to_dict(), "model": {"name": model.meta.name, "args": model.meta.args},
              "data": data_meta, "total_steps": total, "processes": dist.world_size, "fp32_linear": fp32_linear,
              **run_info(dist.device, config)}
    dist.on_main(ck.atomic_write_bytes, model_dir / "config.json", json.dumps(record, indent=2).encode())
    dist.on_main(truncate_metrics, model_dir / "metrics.jsonl", state.step)


def save_state(state: TrainState, model_dir: Path, config: TrainConfig, data_meta: dict) -> None:
    """Checkpoint ``state`` and delete all but the newest ``config.keep_checkpoints``."""
    path = ck.save_checkpoint(ck.checkpoint_path(model_dir, state.step), model=state.model,
                              optimizer=state.optimizer, step=state.step, config=config.to_dict(), data=data_meta,
                              ema=state.ema, extra={"grad_scaler": controls.scaler_state(state.scaler)})
    for old in ck.list_checkpoints(model_dir)[:-config.keep_checkpoints]:
        if old != path:
            old.unlink(missing_ok=True)


def _make_model_dir(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create model directory {model_dir}: {e.strerror}") from None
    return model_dir


def _make_hooks(model_dir: Path, total: int, step: int, dist: distributed.DistContext, log, progress: bool | None,
                extra: list | None) -> list:
    bar = ProgressBar(total, step, progress if dist.is_main else False)
    if not dist.is_main:
        return [bar]  # other ranks neither print nor write
    # Log lines go through the bar while it is shown (so they do not break it), else to `log`.
    return [bar, ConsoleLog(bar.write if bar.shown else log, total), MetricsLog(model_dir / "metrics.jsonl"),
            *(extra or [])]


def _batch(parts: StepParts, step: int, config: TrainConfig,
           dist: distributed.DistContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's indices, augmented float images and targets (class indices, or MixUp/CutMix soft targets
    [N, K]) of the global batch for ``step``."""
    idx = parts.sampler.indices(step)
    images_u8, y = parts.batches.take(idx)  # resident, or gathered from the decoded cache (data_memory_gb)
    flips = parts.flips.mask(idx, step) if parts.flips is not None else None
    idx = idx.to(parts.batches.device)
    gen = step_generator(config.seed, step)
    x = parts.augment(images_u8.float().div_(255.0), gen, flips)
    if config.mixup or config.cutmix:  # drawn after augment's draws, from the same stream
        x, y = controls.mix_batch(x, y, parts.num_classes, gen, mixup=config.mixup, cutmix=config.cutmix)
    idx, x, y = dist.shard(idx), dist.shard(x), dist.shard(y)  # this rank's rows of the global batch
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return idx, x, y


def _check_finite(loss: torch.Tensor, step: int, last_good: Callable[[], Path | None]) -> None:
    if not torch.isfinite(loss):
        good = last_good()
        raise TrainingDiverged(f"loss became {loss.item()} at step {step}; stopped without saving "
                               f"(last good checkpoint: {good.name if good else 'none'}); try a lower lr")


def _train_record(step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, *, lr: float,
                  samples_per_s: float, elapsed: float, config: TrainConfig, dist: distributed.DistContext) -> dict:
    """The log record of a training step: the global batch's loss and accuracy, lr and throughput."""
    rec = {"kind": "train", "step": step, "loss": loss.item(),
           "acc": dist.mean((logits.argmax(1) == labels).float().mean()).item(),
           "lr": lr, "samples_per_s": samples_per_s, "time": round(elapsed, 3)}
    if config.log_probs:
        rec["probs"] = torch.softmax(logits[:config.log_probs].float(), 1).tolist()
    return rec


def _saved_at(path: Path | None, step: int) -> bool:
    """Whether ``path`` (the newest checkpoint, or None) is the checkpoint of ``step``."""
    return path is not None and path == ck.checkpoint_path(path.parent, step)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(p, 1 - decay)
            else:
                e.copy_(p)


def fit(config: TrainConfig, model_dir: str | Path, *, data_dir: str | None = None,
        train_set: ArrayDataset | None = None, test_set: ArrayDataset | None = None,
        log=print, progress: bool | None = None, hooks: list | None = None,
        val_set: ArrayDataset | None = None, force: bool = False) -> FitResult:
    """Train (or resume training) ``config`` in ``model_dir``; evaluate on the test split at the end.

    Args:
        config: The run's settings.
        model_dir: Where checkpoints, ``config.json`` and ``metrics.jsonl`` go; resumed from if it has any.
        data_dir: First place to look for dataset files.
        train_set, test_set: Pre-loaded data (else loaded by name from ``config.dataset``).
        log: Where log lines go.
        progress: Show a progress bar (None: when stderr is a terminal).
        hooks: Extra hooks (objects with ``on_record(rec)`` and ``close()``, e.g. a TensorBoard writer);
            they see every train/eval record after the built-in ones.
        val_set: The split evaluated every ``eval_every`` steps, which picks ``best.safetensors`` and stops
            early (default: the test split).
        force: Train in ``model_dir`` even if it holds files cnnlab did not write (see `rundir`).

    The run directory is locked for the whole call (a second trainer on it stops with `rundir.RunDirError`).
    SIGTERM, or Ctrl-C during the optimisation steps, saves a checkpoint at the current step and raises
    `rundir.Preempted` (single process only).

    Under ``torchrun --nproc-per-node N`` the same call trains data-parallel (see `distributed`): the
    global batch ``config.batch_size`` is split over the N processes, and only rank 0 logs and writes.
    """
    with distributed.session(select_device(config.device)) as dist, \
            (rundir.claim(model_dir, force) if dist.is_main else contextlib.nullcontext()), \
            rundir.on_stop_signals(model_dir, dist.world_size == 1) as stop:  # ranks could see it at different steps
        dist.check_batch_size(config.batch_size)
        return _fit(config, model_dir, dist, data_dir=data_dir, train_set=train_set, test_set=test_set, val_set=val_set,
                    log=log if dist.is_main else (lambda *a: None), progress=progress, hooks=hooks, stop=stop)


def _load_splits(config: TrainConfig, data_dir: str | None, train_set: ArrayDataset | None,
                 test_set: ArrayDataset | None, val_set: ArrayDataset | None
                 ) -> tuple[TrainConfig, ArrayDataset, ArrayDataset, ArrayDataset]:
    """The run's train, test and validation splits: the ones given, else loaded by ``config.dataset``'s name.

    Returns:
        ``config`` (with a folder dataset's decode size resolved when the data is loaded by name; see
        `sized_dataset`), then the train, test and validation splits. The validation split is the test
        split itself unless the dataset has its own (e.g. a folder's ``val/`` beside its ``test/``).
    """
    if train_set is None:
        config = sized_dataset(config)
    train_set = train_set or load_dataset(config.dataset, "train", data_dir=data_dir)
    test_set = test_set or load_dataset(config.dataset, "test", data_dir=data_dir)
    if val_set is None and validation_split(config.dataset):
        val_set = load_dataset(config.dataset, "val", data_dir=data_dir)
    return config, train_set, test_set, val_set or test_set


def _fit(config: TrainConfig, model_dir: str | Path, dist: distributed.DistContext, *, data_dir, train_set,
         test_set, val_set, log, progress, hooks, stop: rundir.StopRequest) -> FitResult:
    """`fit` in one process of a (possibly one-process) run: data, model, resume, run record, loop, results."""
    t0 = time.perf_counter()
    # 'auto' is decided here, from the device only (never a timing), and the run records the outcome
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, dist.device.type))
    controls.check_precision(config.precision, dist.device)
    model_dir = _make_model_dir(model_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    config, train_set, test_set, val_set = _load_splits(config, data_dir, train_set, test_set, val_set)

    resuming = ck.latest_checkpoint(model_dir) is not None
    model, fp32_linear = prepare_model(config, train_set, dist.device, resuming)
    if config.init_from and not resuming:
        log(finetune.init_from(model, config.init_from, list(train_set.info.class_names)))
    state = TrainState(model, make_optimizer(config, model), copy.deepcopy(model).eval() if config.ema else None,
                       scaler=controls.make_scaler(config.precision, dist.device))
    resume(state, model_dir, config, dist, log)
    selection = controls.resume_selection(config, model_dir, state.step, dist.is_main)
    total = config.total_steps(len(train_set))
    data_meta = data_record(config, train_set.info, model.meta)
    write_run_record(model_dir, config, state, data_meta, total=total, fp32_linear=fp32_linear, dist=dist)

    all_hooks = _make_hooks(model_dir, total, state.step, dist, log, progress, hooks)
    try:
        final, test, val, best = train_loop(
            state, config, train_set, test_set, total=total, dist=dist, t0=t0,
            emit=lambda rec: [h.on_record(rec) for h in all_hooks],
            save=lambda: dist.on_main(save_state, state, model_dir, config, data_meta),
            last_good=lambda: ck.latest_checkpoint(model_dir), val_set=val_set, selection=selection, stop=stop,
            save_best=lambda: dist.on_main(controls.save_best, model_dir, state.model, state.ema, state.step,
                                           config.to_dict(), data_meta, selection),
            load_best=lambda module: _load_best(model_dir, module))
    finally:
        for h in all_hooks:
            h.close()
    if state.step < total:
        log(selection.stop_message(state.step))
    seconds = time.perf_counter() - t0
    dist.on_main(write_results, model_dir, state.step, total, test, val, seconds, selection, best)
    return FitResult(model=final, step=state.step, test=test, seconds=seconds, model_dir=model_dir, best=best)


def _load_best(model_dir: Path, module: torch.nn.Module) -> bool:
    """Load into ``module`` the weights of ``best.safetensors`` that evaluate and serve load (`ck.served_weights`);
    False without the file."""
    path = Path(model_dir) / ck.BEST_NAME
    if not path.is_file():
        return False
    tensors, _ = ck.load_checkpoint(path)
    ck.load_state_strict(module, ck.served_weights(tensors), str(path))
    return True


def write_results(model_dir: Path, step: int, total: int, test: EvalResult, val: EvalResult | None,
                  seconds: float, selection: controls.Selection, best: tuple[int, EvalResult] | None = None) -> None:
    """Write results.json: the step reached, the test (and separate validation) results, the run's time and,
    when it evaluated during training, the best evaluation, its weights' test results and whether it stopped
    early."""
    result = {"step": step, "test": test.as_dict(), **({"val": val.as_dict()} if val is not None else {}),
              "seconds": round(seconds, 3), **controls.results_record(selection, step, total)}
    if best is not None and "best" in result:
        result["best"]["test"] = best[1].as_dict()
    ck.atomic_write_bytes(model_dir / "results.json", json.dumps(result, indent=2).encode())


@dataclass
class StepParts:
    """What every optimisation step of a `train_loop` call uses, built once before the first.

    Attributes:
        batches: The training images and labels (resident, or streamed from the decoded cache).
        sampler: Batch indices of each step, a function of (seed, step).
        augment: The batched augmentation.
        class_weight: Per-class loss weights [K] on the device, or None.
        train_model: What the step calls: the model, wrapped in DDP under torchrun and compiled when asked.
        frozen_until: Steps that train the head only (see `finetune.frozen_steps`).
        num_classes: K, the width of MixUp/CutMix soft targets.
        flips: The alternating flip's per-sample choices (``alternate_flip``), or None (random flips).
    """

    batches: BatchSource
    sampler: EpochSampler | controls.BalancedSampler
    augment: Augment
    class_weight: torch.Tensor | None
    train_model: torch.nn.Module
    frozen_until: int
    num_classes: int
    flips: AlternatingFlip | None = None


def step_parts(state: TrainState, config: TrainConfig, train_set: ArrayDataset,
               dist: distributed.DistContext) -> StepParts:
    """Build the `StepParts` of a run and put ``state.model`` in train mode.

    Raises:
        ConfigError: when freezing is asked for under torchrun (see `finetune.frozen_steps`).
    """
    batches = BatchSource(train_set.images, train_set.labels, dist.device, config.data_memory_gb)
    sampler = controls.make_sampler(config, train_set.labels)
    class_weight = controls.class_weights(train_set.labels, train_set.info.num_classes, config.class_weights)
    class_weight = class_weight.to(dist.device) if class_weight is not None else None
    augment = Augment.from_config(config, tuple(state.model.meta.input_size[1:]))
    state.model.train()
    train_model = dist.wrap(state.model)  # DDP under torchrun (same parameters as `model`, which is what is saved)
    if config.compile:
        train_model = torch.compile(train_model)  # the first steps pay for the compilation
    frozen_until = finetune.frozen_steps(config, len(train_set), dist.world_size)
    flips = AlternatingFlip(len(train_set), config.batch_size, config.seed) if config.alternate_flip else None
    return StepParts(batches, sampler, augment, class_weight, train_model, frozen_until, train_set.info.num_classes,
                     flips)


def set_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int, total: int) -> None:
    """Set every parameter group's lr for ``step``: ``config.lr`` times the group's ``lr_mult`` times the
    schedule's factor (`steps.lr_factor`)."""
    factor = lr_factor(config.schedule, step, total, config.warmup)
    for group in optimizer.param_groups:
        group["lr"] = config.lr * group.get("lr_mult", 1.0) * factor


def optimise_step(state: TrainState, parts: StepParts, config: TrainConfig, total: int,
                  dist: distributed.DistContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train step ``state.step`` (batch, freeze, lr, forward/backward, EMA) and advance ``state.step`` by one.

    Returns:
        This rank's batch indices [n], its mean loss (this rank's, detached) and its logits [n, K].
    """
    step = state.step
    idx, x, y = _batch(parts, step, config, dist)
    finetune.apply_freeze(state.model, step, parts.frozen_until)
    set_lr(state.optimizer, config, step, total)
    loss, logits = train_step(parts.train_model, state.optimizer, x, y, label_smoothing=config.label_smoothing,
                              precision=config.precision, class_weight=parts.class_weight,
                              clip_grad_norm=config.clip_grad_norm, accumulate=config.accumulate,
                              scaler=state.scaler)
    state.step = step + 1
    if state.ema is not None:
        _ema_update(state.ema, state.model, config.ema)
    return idx, loss, logits


class Throughput:
    """Images trained on since the last log line, and the rate they were trained at."""

    def __init__(self) -> None:
        self.seen, self.since = 0, time.perf_counter()

    def add(self, images: int) -> None:
        self.seen += images

    def take(self, now: float) -> float:
        """Images per second since the last call (or since creation) up to ``now``; starts counting again."""
        rate = self.seen / max(now - self.since, 1e-9)
        self.seen, self.since = 0, now
        return rate


def train_loop(state: TrainState, config: TrainConfig, train_set: ArrayDataset, test_set: ArrayDataset, *,
               total: int, dist: distributed.DistContext, t0: float, emit: Callable[[dict], object],
               save: Callable[[], None], last_good: Callable[[], Path | None], val_set: ArrayDataset | None = None,
               selection: controls.Selection | None = None,
               save_best: Callable[[], None] = lambda: None,
               load_best: Callable[[torch.nn.Module], bool] = lambda module: False,
               stop: rundir.StopRequest | None = None
               ) -> tuple[torch.nn.Module, EvalResult, EvalResult | None, tuple[int, EvalResult] | None]:
    """Run the optimisation steps from ``state.step`` to ``total`` (or an early stop), then evaluate on the
    test split.

    Args:
        state: Model, optimiser, EMA and step; advanced in place.
        config: The run's settings.
        train_set, test_set: The data.
        total: The step to stop at.
        dist: This process's place in a data-parallel run.
        t0: When the run started (``time.perf_counter``), for the records' ``time``.
        emit: Called with every train/eval record.
        save: Checkpoints ``state`` (called at ``ckpt_every`` steps and at the end).
        last_good: The newest checkpoint on disk, named when the loss diverges.
        val_set: Evaluated every ``eval_every`` steps (default: the test split).
        selection: Tracks the best evaluation and decides an early stop (default: from ``config``).
        save_best: Writes ``best.safetensors`` (called after an evaluation that improved).
        load_best: Loads ``best.safetensors``' weights into a model (False when there is none).
        stop: Set by SIGTERM or Ctrl-C: the step is saved, then `rundir.Preempted` is raised. Ctrl-C waits for
            the end of a step only while the steps run (``stop.armed``).

    Returns:
        The model to use (the EMA copy when EMA is on), its test-set result, its result on a separate
        validation split (None when the test split is the validation split), and the step and test-set result
        of the best checkpoint's weights (None when no evaluation picked one).
    """
    parts = step_parts(state, config, train_set, dist)
    selection = selection if selection is not None else controls.Selection.from_config(config)
    crop = run_preprocess(config, train_set.info, state.model.meta).crop  # the run's recorded centre crop
    evals = controls.Evaluator.for_run(config, crop, val_set or test_set, test_set, selection, dist, emit, save_best)
    rate = Throughput()
    if stop is not None:  # a Ctrl-C from here on waits for the end of its step (an exception ends the handlers)
        stop.armed = True
    while state.step < total and not evals.should_stop(state.step):
        idx, loss, logits = optimise_step(state, parts, config, total, dist)
        step = state.step
        rate.add(len(idx) * dist.world_size)
        is_log, is_ckpt = step % config.log_every == 0 or step == total, step % config.ckpt_every == 0 or step == total
        if is_log or is_ckpt:
            loss = dist.mean(loss)  # the global batch's loss: every rank sees the same NaN
            _check_finite(loss, step, last_good)
        if is_log:
            now = time.perf_counter()
            emit(_train_record(step, loss, logits, parts.batches.labels[idx],
                               lr=state.optimizer.param_groups[0]["lr"], samples_per_s=rate.take(now),
                               elapsed=now - t0, config=config, dist=dist))
        if is_ckpt:
            save()
        if stop is not None and stop.check(step):  # SIGTERM or Ctrl-C: keep this step's work, then stop
            if not is_ckpt:
                save()
            raise rundir.Preempted(step, last_good().name, stop.signal_name)
        if evals.due(step, total):
            evals.validate(state.ema or state.model, step)
    if stop is not None:  # the final evaluation: Ctrl-C interrupts at once, as outside training
        stop.armed = False
    if state.step < total and not _saved_at(last_good(), state.step):
        save()  # stopped early: keep the weights it stopped with, so a rerun stops there too
    final = state.ema or state.model
    test, val = evals.finish(final, state.step)
    return final, test, val, evals.best_on_test(final, state.step, test, load_best)
