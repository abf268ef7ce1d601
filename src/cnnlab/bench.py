"""Micro-benchmarks behind ``cnnlab bench``: training throughput, FLOP counts and prediction latency."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .infer import autocast, eval_mode
from .models import create_model
from .models.layers import pool_before_relu, use_onednn_linear


def forward_flops(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-add FLOPs (2 per MAC) of one forward pass for one image, counted on Conv2d and Linear layers."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += 2 * out[0].numel() * k

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal total
        total += 2 * out[0].numel() * m.in_features

    handles = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with eval_mode(model), torch.no_grad():
        model(torch.zeros(1, *input_size))
    for h in handles:
        h.remove()
    return total


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: primitive creation, first-touch of the output
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def peak_flops(dtype: torch.dtype = torch.float32, repeats: int = 3,
               matmul_sizes: tuple[int, ...] = (1024, 2048, 4096), conv: bool = True) -> dict:
    """The practical peak FLOP/s of this machine for ``dtype``: the best of several probes.

    No single shape reaches the peak everywhere: a large matmul spills out of cache, a small one stays in it, and
    on some CPUs a convolution runs faster than any matmul (measured probes in docs/speed.md). So this times
    square matmuls of ``matmul_sizes`` and, with ``conv``, two channels_last convolutions (3x3 256->256 on 16x16,
    5x5 64->32 on 14x14, the shape of the tutorial CNN's conv2 backward), and reports the best.

    Returns {'flops': best FLOP/s, 'probe': name of the best probe, 'probes': {name: FLOP/s}}.
    """
    probes: dict[str, float] = {}
    with torch.no_grad():
        for n in matmul_sizes:
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            probes[f"matmul {n}^3"] = 2 * n ** 3 / _best_seconds(lambda a=a, b=b: a @ b, repeats)
        if conv:
            for name, (batch, cin, cout, k, hw) in {"conv 3x3 256->256 16x16": (64, 256, 256, 3, 16),
                                                    "conv 5x5 64->32 14x14": (100, 64, 32, 5, 14)}.items():
                x = torch.randn(batch, cin, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
                w = torch.randn(cout, cin, k, k).to(dtype).contiguous(memory_format=torch.channels_last)
                sec = _best_seconds(lambda x=x, w=w, k=k: F.conv2d(x, w, padding=k // 2), repeats)
                probes[name] = 2 * batch * hw * hw * cout * cin * k * k / sec
    best = max(probes, key=probes.get)
    return {"flops": probes[best], "probe": best, "probes": probes}


def train_throughput(model_name: str, batch_size: int = 100, steps: int = 100, warmup: int = 10,
                     precision: str = "fp32", channels_last: bool = True, compile: bool = False,
                     optimizer: str = "sgd", lr: float = 1e-3, reorder: bool = True, linear: str | None = None,
                     **model_kw) -> dict:
    """Samples/s of training steps (forward, backward, optimiser) on random data resident in memory.

    ``reorder``: pool before ReLU as the training loop does (``pool_before_relu``); False keeps the
    model's own order (for ablations). ``linear``: 'onednn' or 'torch' for the fp32 dense layers; None picks as
    the training loop does (``cnnlab.runtime.linear_backend``).

    Returns {'samples_per_s', 'step_ms', 'flops_per_sample' (training, ~3x forward), 'flops_per_s'}.
    """
    torch.manual_seed(0)
    model = create_model(model_name, **model_kw)
    size = model.meta.input_size
    flops = 3 * forward_flops(model, size)  # backward ~ 2x forward
    if reorder:
        pool_before_relu(model)  # as the training loop does
    if not compile:
        use_onednn_linear(model, linear)  # as the training loop does
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    step_model = torch.compile(model) if compile else model
    # As the training loop does: a resident uint8 set, a batch gathered by index and scaled each step.
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4096, *size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, model.meta.num_classes, (4096,), generator=gen)
    dev = torch.device("cpu")

    def step():
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x, y = images[idx].float().div_(255.0), labels[idx]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(dev, precision):
            loss = F.cross_entropy(step_model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t) / steps
    return {"samples_per_s": batch_size / dt, "step_ms": dt * 1e3, "flops_per_sample": flops,
            "flops_per_s": flops * batch_size / dt}


def latency(model: nn.Module, input_size: tuple[int, int, int], n: int = 1000, warmup: int = 50) -> dict:
    """Single-image inference latency (ms): p50 / p90 / p99 over ``n`` calls, batch of 1, eval mode."""
    model.eval()
    x = torch.rand(1, *input_size)
    times = []
    with torch.inference_mode():
        for i in range(warmup + n):
            t = time.perf_counter()
            torch.softmax(model(x), 1)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
    times.sort()

    def q(p: float) -> float:
        return times[min(len(times) - 1, int(p * len(times)))]

    return {"p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "mean_ms": statistics.fmean(times), "n": n}
