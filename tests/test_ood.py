"""The rendered out-of-distribution digit set: deterministic, MNIST-shaped, balanced and digit-like."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab.data import ood_digits as ood
from cnnlab.errors import DataError


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return ood.make_ood_digits(60, seed=3)


def test_same_seed_same_images_other_seed_other_images(digits):
    x, y = digits
    x2, y2 = ood.make_ood_digits(60, seed=3)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _ = ood.make_ood_digits(60, seed=4)
    assert not np.array_equal(x, x3)


def test_shapes_dtypes_and_balanced_labels(digits):
    x, y = digits
    assert x.shape == (60, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60,) and y.dtype == np.int64
    assert np.bincount(y, minlength=10).tolist() == [6] * 10


def test_light_digit_on_black(digits):
    x, _ = digits
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
    assert border.max() < 64  # MNIST's frame: the digit sits in the middle 20x20, the border stays dark
    peak = x.reshape(len(x), -1).max(1)
    assert peak.min() >= 0.4 * 255 - 1 and peak.max() >= 240  # ink from faint (40%) to saturated


def test_centre_of_mass_is_centred(digits):
    x, _ = digits
    mass = x.astype(np.float64)
    total = mass.sum((1, 2))
    cy = (mass.sum(2) * np.arange(28)).sum(1) / total
    cx = (mass.sum(1) * np.arange(28)).sum(1) / total
    assert np.abs(cy - 13.5).max() <= 1.0 and np.abs(cx - 13.5).max() <= 1.0


def test_ink_fraction_is_that_of_a_digit(digits):
    # MNIST's digits cover about 10-20% of the 28x28 frame; a blank, a blob or a speck would fall outside.
    x, _ = digits
    peak = x.reshape(len(x), -1).max(1)[:, None, None]
    ink = (x > peak / 2).mean((1, 2))
    assert ink.min() > 0.02 and ink.max() < 0.45
    assert 0.08 < ink.mean() < 0.25


def test_ink_extent_fills_the_20_pixel_box(digits):
    x, _ = digits
    for im in x:
        ys, xs = np.nonzero(im > 25)
        assert max(np.ptp(ys), np.ptp(xs)) + 1 >= 17  # the longer side is scaled to ~20 px, as MNIST


def test_varied_styles_give_varied_images():
    # Ten samples of the same digit must not be copies of each other.
    x, y = ood.make_ood_digits(100, seed=0)
    sevens = x[y == 7].astype(np.int32)
    diffs = [np.abs(sevens[i] - sevens[j]).mean() for i in range(len(sevens)) for j in range(i)]
    assert min(diffs) > 5


def test_fonts_come_with_matplotlib():
    fonts = ood.available_fonts()
    assert len(fonts) >= 10 and all((ood.font_dir() / f).is_file() for f in fonts)


def test_bad_size_is_a_data_error():
    with pytest.raises(DataError, match="n >= 1"):
        ood.make_ood_digits(0)


# ---------------------------------------------------------------- the benchmark scripts' pieces


@pytest.fixture
def bench_modules(monkeypatch):
    """benchmarks/ is scripts, not a package: import ood_digits and common from it."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import common
    import ood_digits as bench

    return bench, common


def test_benchmark_lists_every_mnist_recipe_and_only_those(bench_modules):
    bench, _ = bench_modules
    names = bench.mnist_recipes()
    assert {"mnist-fast", "mnist-99.5", "tf2-convnet-mnist", "lenet5-mnist"} <= set(names)
    assert "fashion-mnist-fast" not in names and not any(n.startswith("cifar") for n in names)


def test_benchmark_scores_a_trained_run(bench_modules, tmp_path, data_env):
    from runs import train_tiny_run

    bench, _ = bench_modules
    run = train_tiny_run(tmp_path)
    x, y = ood.make_ood_digits(20, seed=0)
    row = bench.score_run(run, "lenet5-mnist", torch.from_numpy(x)[:, None], torch.from_numpy(y))
    assert row["recipe"] == "lenet5-mnist" and row["seed"] == 0
    assert 0.0 <= row["ood_accuracy"] <= 1.0 and abs(row["ood_accuracy"] * 20 - round(row["ood_accuracy"] * 20)) < 1e-5
    table = bench.summarise([row, {**row, "seed": 1, "ood_accuracy": 0.5}])
    assert table[0][:3] == ["lenet5-mnist", 2, "0,1"]


def test_times_are_stated_against_the_host(bench_modules):
    _, common = bench_modules
    host = {"reference": {"seconds": 2.0}, "peak": {"fp32": 1e11, "bf16": 4e11}}
    r = common.seconds_ratios(10.0, host, "bf16")
    assert r == {"seconds": 10.0, "per_reference": 5.0, "peak_tflop": pytest.approx(4.0)}


def test_a_failing_training_run_ends_the_benchmark_in_one_line(bench_modules, tmp_path, data_env):
    _, common = bench_modules
    with pytest.raises(SystemExit) as excinfo:
        common.run_cli_train("no-such-recipe", tmp_path / "run", [], log_file=tmp_path / "run.log")
    message = str(excinfo.value.code)
    assert "\n" not in message and message.startswith("run run failed: cnnlab: error: ")
    assert "no-such-recipe" in message and message.endswith(f"(log: {tmp_path / 'run.log'})")


def test_a_benchmark_trains_its_run_once_and_retrains_one_that_stopped_part_way(bench_modules, tmp_path,
                                                                               monkeypatch):
    _, common = bench_modules
    trained = []

    def fake_train(recipe, run, overrides, log_file=None):
        trained.append((recipe, run, overrides))
        (run / "config.json").write_text("{}")
        (run / "results.json").write_text("{}")
        return {"test": {"accuracy": 0.5}, "wall": 1.0}

    monkeypatch.setattr(common, "run_cli_train", fake_train)
    run = common.ensure_trained_run(None, tmp_path, "r", ["--steps=2"], recipe="mnist-fast")
    assert run == tmp_path / "r" and trained == [("mnist-fast", run, ["--steps=2"])]
    assert common.ensure_trained_run(None, tmp_path, "r", ["--steps=2"]) == run and len(trained) == 1  # reused
    # a run stopped part-way: a checkpoint and no results; its files are cleared before it trains again
    (run / "results.json").unlink()
    (run / "ckpt-00000001.safetensors").write_bytes(b"partial")
    assert common.ensure_trained_run(None, tmp_path, "r", []) == run and len(trained) == 2
    assert not (run / "ckpt-00000001.safetensors").exists()
    # a given run is used as it is, and must be a run directory
    assert common.ensure_trained_run(str(run), tmp_path, "other", []) == run and len(trained) == 2
    with pytest.raises(SystemExit, match="not a run directory"):
        common.ensure_trained_run(str(tmp_path / "missing"), tmp_path, "other", [])
