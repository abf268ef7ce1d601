"""Rebuild a trained model from a run directory or checkpoint file, using only the checkpoint's own facts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, CnnlabError
from ..models import create_model
from . import checkpoint as ck
from .controls import choose_checkpoint


@dataclass
class TrainedModel:
    """A model ready for inference, with what is needed to feed it and name its outputs."""

    model: torch.nn.Module
    classes: list[str]
    data_shape: tuple[int, int, int]  # (C, H, W) of the training images (inputs are resized to this)
    dataset: str
    step: int
    config: dict
    path: Path


def find_checkpoint(path: str | Path, which: str = "auto") -> Path:
    """``path`` itself if it is a file, else the run's best checkpoint when it kept one, else its newest
    (``which``: auto, latest, best or a file; see `controls.choose_checkpoint`)."""
    return choose_checkpoint(path, which)


def load_trained(path: str | Path, device: str | torch.device = "cpu", prefer_ema: bool = True,
                 checkpoint: str = "auto") -> TrainedModel:
    """Load a run's best checkpoint (else its newest; or a given checkpoint file) in eval mode.

    The architecture is rebuilt from the name and arguments stored in the checkpoint; weights must match it
    exactly. With ``prefer_ema`` the averaged weights are used when the run kept them. ``checkpoint``
    chooses another one of the run's: latest, best or a file.
    """
    file = find_checkpoint(path, checkpoint)
    tensors, meta = ck.load_checkpoint(file)
    try:
        m = meta["model"]
        model = create_model(m["name"], **m["args"])
    except KeyError as e:
        raise CheckpointError(f"{file}: checkpoint header lacks {e}") from None
    except CnnlabError as e:
        raise CheckpointError(f"{file}: cannot rebuild its model: {e}") from None
    state = ck.section(tensors, "ema") if prefer_ema else {}
    ck.load_state_strict(model, state or ck.section(tensors, "model"), str(file))
    model.to(device).eval()
    data = meta.get("data", {})
    classes = data.get("classes") or [str(i) for i in range(model.meta.num_classes)]
    shape = tuple(data.get("shape") or model.meta.input_size)
    return TrainedModel(model=model, classes=list(classes), data_shape=shape, dataset=data.get("dataset", ""),
                        step=meta.get("step", 0), config=meta.get("config", {}), path=file)
