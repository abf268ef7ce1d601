"""A tiny trained run for tests that need one (export, serve, robustness): lenet5, 4 steps on tiny MNIST.

Tests get it through the ``tiny_run`` / ``tiny_run_copy`` fixtures (conftest.py), trained once per session.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest
from fakedata import write_mnist

from cnnlab.cli import main

TINY_TRAIN = ["--no-progress", "--no-report", "--batch_size=16", "--log_every=2", "--eval_batch_size=16"]


class TinyRun(NamedTuple):
    """A trained run and the data root it was trained from.

    Attributes:
        path: The run directory.
        data: A data root holding tiny MNIST (pass as ``--data-dir`` / ``data_dir``).
    """

    path: Path
    data: Path


def train_tiny_run(root: Path, steps: int = 4, ckpt_every: int = 4, extra: Sequence[str] = ()) -> Path:
    """Write tiny MNIST under ``root/data`` and train lenet5 on it into ``root/run``; returns the run directory.
    ``extra``: more ``--key=value`` overrides (e.g. ``["--tta=flip"]``)."""
    write_mnist(root / "data")
    run = root / "run"
    rc = main(["train", "--recipe", "lenet5-mnist", "--model-dir", str(run), "--data-dir", str(root / "data"),
               f"--steps={steps}", f"--ckpt_every={ckpt_every}", *TINY_TRAIN, *extra])
    assert rc == 0
    return run


def copy_run(run: TinyRun, dest: Path) -> TinyRun:
    """A private copy of ``run``'s directory at ``dest`` (the data root is shared: nothing writes there)."""
    return TinyRun(path=Path(shutil.copytree(run.path, dest)), data=run.data)


def crash_during_step(monkeypatch: pytest.MonkeyPatch, n: int, train: Callable[[], object]) -> None:
    """Runs ``train`` with the loop's `train_step` raising KeyboardInterrupt on its ``n``-th call, as a process
    killed during that step would stop; asserts the training did stop there, then puts the real step back."""
    from cnnlab.train import loop

    real, calls = loop.train_step, {"n": 0}

    def crash(*args, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(loop, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(loop, "train_step", real)
