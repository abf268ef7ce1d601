"""Shared test setup: tiny on-disk datasets and a tiny trained run.

Fixtures:
    data_env: isolates dataset lookup from this machine (no ``$CNNLAB_DATA``,
        a private ``$XDG_CACHE_HOME``, no system dirs, no download mirrors), so
        no test reads real datasets or touches the network by accident.
    tiny_data: a data root holding tiny MNIST, Fashion-MNIST and CIFAR-10 in
        their real formats (see ``fakedata.py``), also set as ``$CNNLAB_DATA``
        so ``load_dataset("mnist")`` finds it without a ``data_dir``.
    tiny_run: a tiny lenet5 run (4 steps on tiny MNIST, checkpoints at steps 2
        and 4), trained once per session; read-only (see `TinyRun`).
    tiny_run_copy: a private copy of that run for tests that change or damage it.
"""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import pytest
from fakedata import write_cifar, write_mnist
from hypothesis import settings
from runs import TinyRun, copy_run, train_tiny_run

# Property tests draw the same examples on every run of the suite (pyproject's addopts select "repeatable"), so
# a run's result does not depend on luck: a suite that passed passes again. `pytest --hypothesis-profile=explore`
# draws fresh random examples to look for new failures; each one it finds becomes a fixed regression test.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)

# A suite started as a background job of a script (`make test &`) inherits an ignored SIGINT, and so would every
# `cnnlab train` it starts: cnnlab then rightly leaves Ctrl-C ignored. The Ctrl-C tests need it as a terminal gives
# it, so the suite starts from Python's default; the ignored case has its own test (test_rundir.py).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Cuts dataset lookup off from the machine; returns the (empty) private cache root."""
    from cnnlab.data import download as dl
    from cnnlab.data import sources

    monkeypatch.delenv("CNNLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", ())
    for name in ("MNIST_REMOTE", "FASHION_MNIST_REMOTE", "CIFAR10_REMOTE"):
        monkeypatch.setattr(dl, name, dataclasses.replace(getattr(dl, name), mirrors=()))
    return tmp_path / "xdg-cache" / "cnnlab"


@pytest.fixture
def tiny_data(tmp_path: Path, data_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data root with tiny mnist (64 train / 32 test), fashion-mnist (same sizes) and
    cifar10 (5 x 20 train / 20 test); also exported as ``$CNNLAB_DATA``."""
    root = tmp_path / "data"
    write_mnist(root)
    write_mnist(root, seed=1, folder="fashion-mnist")
    write_cifar(root)
    monkeypatch.setenv("CNNLAB_DATA", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """The session's tiny trained run; tests must not write into it (use ``tiny_run_copy``)."""
    root = tmp_path_factory.mktemp("tiny-run")
    return TinyRun(path=train_tiny_run(root, ckpt_every=2), data=root / "data")


@pytest.fixture
def tiny_run_copy(tiny_run: TinyRun, tmp_path: Path) -> TinyRun:
    """A private copy of ``tiny_run`` (the data root is shared: nothing writes there)."""
    return copy_run(tiny_run, tmp_path / "tiny-run")
