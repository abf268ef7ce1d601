"""A tiny trained run for tests that need one (export, serve, robustness): lenet5, 4 steps on tiny MNIST."""

from __future__ import annotations

from pathlib import Path

from cnnlab.cli import main
from fakedata import write_mnist

TINY_TRAIN = ["--no-progress", "--no-report", "--batch_size=16", "--log_every=2", "--eval_batch_size=16"]


def train_tiny_run(root: Path, steps: int = 4, ckpt_every: int = 4) -> Path:
    """Write tiny MNIST under ``root/data`` and train lenet5 on it into ``root/run``; returns the run directory."""
    write_mnist(root / "data")
    run = root / "run"
    rc = main(["train", "--recipe", "lenet5-mnist", "--model-dir", str(run), "--data-dir", str(root / "data"),
               f"--steps={steps}", f"--ckpt_every={ckpt_every}", *TINY_TRAIN])
    assert rc == 0
    return run
