"""Train/eval mode switching shared by every layer (models, analysis, inference); imports nothing of cnnlab."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (dropout off, batch-norm statistics frozen) for the block, then give every
    submodule back its own previous mode, also when the block raises.

    Each submodule's flag is restored, not just the top one's: a model training with some parts held in
    eval mode (e.g. the batch-norm layers of a frozen backbone) keeps them that way.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
