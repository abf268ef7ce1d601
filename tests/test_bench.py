"""cnnlab.bench and `cnnlab bench`: FLOP counts, the peak probes, throughput figures, and argument checks."""

from __future__ import annotations

import pytest
import torch

from cnnlab.bench import forward_flops, latency, peak_flops, train_throughput
from cnnlab.cli import main
from cnnlab.models import create_model


def test_forward_flops_of_the_tutorial_cnn_match_the_layer_arithmetic():
    conv1 = 2 * 28 * 28 * 32 * (1 * 5 * 5)
    conv2 = 2 * 14 * 14 * 64 * (32 * 5 * 5)
    dense = 2 * 1024 * 3136
    logits = 2 * 10 * 1024
    assert forward_flops(create_model("tf-estimator-cnn"), (1, 28, 28)) == conv1 + conv2 + dense + logits


def test_forward_flops_counts_groups_and_leaves_the_model_as_it_was():
    nn = torch.nn
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(8 * 16, 3))
    m.train()
    assert forward_flops(m, (4, 4, 4)) == 2 * 16 * 8 * (2 * 9) + 2 * 3 * 128
    assert m.training
    assert not m[0]._forward_hooks and not m[2]._forward_hooks


def test_peak_flops_reports_the_best_probe():
    r = peak_flops(torch.float32, repeats=1, matmul_sizes=(64, 128), conv=True)
    assert set(r["probes"]) == {"matmul 64^3", "matmul 128^3", "conv 3x3 256->256 16x16", "conv 5x5 64->32 14x14"}
    assert all(v > 0 for v in r["probes"].values())
    assert r["flops"] == max(r["probes"].values()) == r["probes"][r["probe"]]
    r = peak_flops(torch.bfloat16, repeats=1, matmul_sizes=(64,), conv=False)
    assert list(r["probes"]) == ["matmul 64^3"]


def test_train_throughput_figures_are_consistent():
    r = train_throughput("lenet5", batch_size=8, steps=2, warmup=1)
    assert r["samples_per_s"] > 0
    assert r["samples_per_s"] == pytest.approx(8 / (r["step_ms"] / 1e3))
    assert r["flops_per_sample"] == 3 * forward_flops(create_model("lenet5"), (1, 28, 28))
    assert r["flops_per_s"] == pytest.approx(r["flops_per_sample"] * r["samples_per_s"])


def test_latency_percentiles_are_ordered():
    m = create_model("lenet5")
    r = latency(m, m.meta.input_size, n=20, warmup=2)
    assert r["n"] == 20
    assert 0 < r["p50_ms"] <= r["p99_ms"]


def test_bench_command_compares_with_the_peak_of_its_own_precision(capsys):
    argv = ["bench", "lenet5", "--batch-size", "4", "--steps", "1", "--latency-n", "3", "--precision", "bf16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "lenet5: train batch 4 (bf16" in out and "of this CPU's bf16 peak" in out and "best probe:" in out
    assert "single-image latency p50" in out


@pytest.mark.robust
@pytest.mark.parametrize("argv, needle", [
    (["bench", "lenet5", "--steps", "0"], "argument --steps: 0 is out of range (must be at least 1)"),
    (["bench", "lenet5", "--batch-size", "x"], "argument --batch-size: 'x' is not an integer"),
    (["bench", "lenet5", "--threads", "-1"], "argument --threads: -1 is out of range (must be at least 0)"),
    (["predict", "run", "a.png", "--top-k", "0"], "argument --top-k"),
    (["plot", "run", "samples", "-n", "26"], "argument -n: 26 is out of range (must be 1 to 25)"),
    (["serve", "run", "--port", "70000"], "must be 0 to 65535"),
    (["serve", "run", "--max-wait-ms", "nan"], "argument --max-wait-ms"),
    (["serve", "run", "--max-upload-mb", "0"], "must be above 0"),
    (["export", "run", "--tolerance", "-1"], "argument --tolerance"),
    (["models", "--zz"], "cnnlab models: error: unrecognized arguments: --zz"),
    (["bench", "lenet5", "--precision", "fp16"], "invalid choice: 'fp16'"),
])
def test_bad_arguments_get_one_usage_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err and "--help" in err, err


def test_bench_rejects_an_unknown_model_in_one_line(capsys):
    assert main(["bench", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnlab: error: unknown model 'nosuch'") and len(err.strip().splitlines()) == 1
