"""Fine-tuning controls, as fastai's ``fine_tune``: start from other weights, freeze the backbone, lower its lr.

The backbone is a model's ``features``, the head its ``head`` (every `CnnModel` has both).

- ``init_from``: copy the weights of another run (or a ``.safetensors`` checkpoint) into the new model. The
  classifier (the head's last layer with parameters) starts afresh when the classes differ; any other
  difference is an error naming the first mismatching key.
- ``freeze_steps`` / ``freeze_epochs``: the backbone's parameters get no gradients for the first N steps, and
  its batch-norm layers stay in eval mode (running statistics unchanged, as fastai's ``freeze`` with
  ``train_bn=False``); then everything trains.
- ``backbone_lr_mult``: the backbone's parameter groups carry ``lr_mult`` (the loop multiplies the scheduled
  lr by it), so a pretrained backbone moves more slowly than the new head.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import checkpoint as ck
from ..config import TrainConfig
from ..errors import CheckpointError, ConfigError


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    if not (hasattr(model, "features") and hasattr(model, "head")):
        raise ConfigError(f"{type(model).__name__} has no features/head parts to fine-tune separately")
    return model.features, model.head


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Optimiser parameter groups: weight decay on >= 2-D tensors only; the backbone's groups at ``lr_mult``, the
    biases and norm parameters (1-D) at ``norm_lr_mult`` times their group's.

    With ``backbone_lr_mult == 1`` the groups are the same two as a plain run's (so its checkpoints resume).
    """

    def split(params: list[torch.Tensor], mult: float) -> list[dict]:
        norm = mult * config.norm_lr_mult
        return [{"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay,
                 "lr_mult": mult, "lr": config.lr * mult},
                {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0,
                 "lr_mult": norm, "lr": config.lr * norm}]

    if config.backbone_lr_mult == 1.0:
        return split(list(model.parameters()), 1.0)
    features, head = _parts(model)
    # The head's groups first: the loop logs the first group's lr, which should be the lr the config names.
    return split(list(head.parameters()), 1.0) + split(list(features.parameters()), config.backbone_lr_mult)


def frozen_steps(config: TrainConfig, num_train: int, world_size: int = 1) -> int:
    """How many first steps train the head only (from ``freeze_steps`` or ``freeze_epochs``).

    Raises:
        ConfigError: when freezing is asked for in a data-parallel run (DDP fixes the set of parameters that
            get gradients when it wraps the model, so they cannot change mid-run).
    """
    steps = config.freeze_steps
    if config.freeze_epochs > 0:
        steps = max(1, math.ceil(config.freeze_epochs * num_train / config.batch_size))
    if steps and world_size > 1:
        raise ConfigError("freeze_steps / freeze_epochs work in single-process runs only, not under torchrun")
    return steps


def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """Stop (or restart) training the backbone: no gradients for its parameters, its batch norms in eval mode.

    Unfreezing puts the batch norms back in the model's own mode (train during training), and restarts only the
    parameters that freezing stopped: those the model keeps fixed by design (airbench's whitening filters, frozen
    batch-norm scales) stay fixed.
    """
    features, _ = _parts(model)
    if frozen and not hasattr(model, "_frozen_by_finetune"):
        model._frozen_by_finetune = [p for p in features.parameters() if p.requires_grad]
    for p in (model.__dict__.pop("_frozen_by_finetune", []) if not frozen else model._frozen_by_finetune):
        p.requires_grad_(not frozen)
    for m in features.modules():
        if isinstance(m, _BatchNorm):
            m.train(model.training and not frozen)


def apply_freeze(model: nn.Module, step: int, until: int) -> None:
    """Before training step ``step`` (0-based): the backbone frozen while ``step < until``, unfrozen at ``until``.

    Called every step because evaluation puts the whole model back in train mode, batch norms included.
    """
    if step < until:
        set_backbone_frozen(model, True)
    elif step == until and until > 0:
        set_backbone_frozen(model, False)


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier: the last layer with parameters in the model's ``head``."""
    _, head = _parts(model)
    last = None
    for name, m in head.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            last = name
    if last is None:
        return set()
    prefix = f"head.{last}." if last else "head."
    return {k for k in model.state_dict() if k.startswith(prefix) and "." not in k[len(prefix):]}


def _read_source(source: str) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """Weights (the averaged ones when the run kept them) and class names of a run (its best checkpoint, else
    its newest) or of a checkpoint file."""
    path = Path(source)
    if path.is_dir():
        if ck.best_checkpoint(path) is None and ck.latest_checkpoint(path) is None:
            raise CheckpointError(f"init_from {source}: no checkpoint in that directory")
        path = ck.choose_checkpoint(path)  # the best one (chosen by validation) when the run kept one
    elif not path.is_file():
        raise CheckpointError(f"init_from {source}: no such run directory or checkpoint file")
    tensors, meta = ck.load_checkpoint(path)
    state = ck.served_weights(tensors)
    if not state:
        raise CheckpointError(f"init_from {source}: no model weights in {path.name}")
    classes = (meta.get("data") or {}).get("classes")
    return state, list(classes) if classes else None


def init_from(model: nn.Module, source: str, class_names: list[str]) -> str:
    """Load the weights of ``source`` (run directory or checkpoint file) into ``model``, in place.

    The classifier keeps its fresh initialisation when the source was trained on other classes (another
    count, or other names); every other key must exist on both sides with the same shape.

    Returns:
        One line saying what was loaded, for the log.

    Raises:
        CheckpointError: naming the first missing, unexpected or differently shaped key.
    """
    state, source_classes = _read_source(source)
    own = model.state_dict()
    head = classifier_keys(model)
    replace = source_classes is not None and list(source_classes) != list(class_names)
    if any(k in state and state[k].shape != own[k].shape for k in head):
        replace = True  # another class count (a file without class names)
    for k in own:
        if k not in state and not (replace and k in head):
            raise CheckpointError(f"init_from {source}: it has no {k} (the model's shape {tuple(own[k].shape)}); "
                                  "is it the same architecture?")
    for k in state:
        if k not in own:
            raise CheckpointError(f"init_from {source}: its {k} {tuple(state[k].shape)} is not in the model")
        if not (replace and k in head) and state[k].shape != own[k].shape:
            raise CheckpointError(f"init_from {source}: {k} has shape {tuple(state[k].shape)}, the model's is "
                                  f"{tuple(own[k].shape)}")
    load = {k: v for k, v in state.items() if not (replace and k in head)}
    with torch.no_grad():
        for k, v in load.items():
            own[k].copy_(v)
    note = f"; new classifier {', '.join(sorted(head))}" if replace else ""
    return f"initialised from {source}: {len(load)} tensors{note}"
