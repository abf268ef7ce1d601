"""Rebuild a trained model from a run directory or checkpoint file, using only the checkpoint's own facts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, CnnlabError
from ..models import create_model
from . import checkpoint as ck


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


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a file, else the newest checkpoint in that run directory."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"no such run directory or checkpoint: {path}")
    found = ck.latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no checkpoint in {path} (train first: cnnlab train --model-dir {path} ...)")
    return found


def load_trained(path: str | Path, device: str | torch.device = "cpu", prefer_ema: bool = True) -> TrainedModel:
    """Load the newest checkpoint of a run (or a given checkpoint file) in eval mode.

    The architecture is rebuilt from the name and arguments stored in the checkpoint; weights must match it
    exactly. With ``prefer_ema`` the averaged weights are used when the run kept them.
    """
    file = find_checkpoint(path)
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
