"""fp32 dense layers through oneDNN (cnnlab.models.layers.OneDnnLinear) and the machine's choice of backend."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from cnnlab import runtime
from cnnlab.errors import ConfigError
from cnnlab.models import create_model
from cnnlab.models.layers import ONEDNN_MIN_MACS, OneDnnLinear, use_onednn_linear

needs_onednn = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                       and hasattr(torch.ops.mkldnn, "_linear_pointwise")), reason="no oneDNN")


def _pair(in_f: int, out_f: int, bias: bool = True) -> tuple[nn.Linear, OneDnnLinear]:
    torch.manual_seed(0)
    ref = nn.Linear(in_f, out_f, bias=bias)
    fast = copy.deepcopy(ref)
    assert use_onednn_linear(fast, "onednn") == 1
    assert type(fast) is OneDnnLinear
    return ref, fast


@needs_onednn
@pytest.mark.parametrize("batch, in_f, out_f, bias", [
    (100, 3136, 1024, True),  # the tutorial CNN's dense layer: every product through oneDNN
    (7, 300, 50, False),  # below ONEDNN_MIN_MACS: torch's own products, same answers
    (64, 512, 129, True),  # odd sizes
])
def test_onednn_linear_matches_nn_linear_forward_and_gradients(batch, in_f, out_f, bias):
    ref, fast = _pair(in_f, out_f, bias)
    x = torch.randn(batch, in_f)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fast(xf)
    torch.testing.assert_close(yf, yr, rtol=1e-5, atol=1e-4)
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-3)
    if bias:
        torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_onednn_linear_handles_leading_dims_frozen_weights_and_no_grad():
    ref, fast = _pair(256, 512)
    x = torch.randn(4, 5, 256)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-4)
    assert fast(x).shape == (4, 5, 512)
    fast.weight.requires_grad_(False)
    xf = x.clone().requires_grad_()
    fast(xf).sum().backward()
    assert fast.weight.grad is None and fast.bias.grad is not None and xf.grad.shape == x.shape
    with torch.no_grad():
        assert not fast(x).requires_grad


@needs_onednn
def test_onednn_linear_leaves_bf16_and_autocast_to_nn_linear(monkeypatch):
    ref, fast = _pair(1024, 1024)
    called = []
    monkeypatch.setattr("cnnlab.models.layers._OneDnnLinearFn.apply", lambda *a: called.append(1))
    x = torch.randn(64, 1024)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x).dtype is torch.bfloat16
    assert fast.to(torch.bfloat16)(x.bfloat16()).dtype is torch.bfloat16
    assert called == []


@needs_onednn
def test_use_onednn_linear_keeps_state_dict_and_gradients():
    torch.manual_seed(0)
    a = create_model("tf-estimator-cnn")
    b = copy.deepcopy(a)
    assert use_onednn_linear(b, "onednn") == 2
    assert use_onednn_linear(b, "onednn") == 0  # already converted
    assert list(a.state_dict()) == list(b.state_dict())
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for m in (a, b):
        torch.manual_seed(1)  # the same dropout mask
        nn.functional.cross_entropy(m(x), y).backward()
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pb.grad is not None, k
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6, msg=k)


def test_use_onednn_linear_does_nothing_for_the_torch_backend():
    m = create_model("tf-estimator-cnn")
    assert use_onednn_linear(m, "torch") == 0
    assert not any(isinstance(x, OneDnnLinear) for x in m.modules())


@needs_onednn
@pytest.mark.parametrize("out_f, via_onednn", [(ONEDNN_MIN_MACS // 2048, True), (ONEDNN_MIN_MACS // 2048 - 1, False)])
def test_products_below_the_min_macs_threshold_stay_with_torch(out_f, via_onednn, monkeypatch):
    from cnnlab.models import layers

    real, calls = torch.ops.mkldnn._linear_pointwise, []

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    a, b = torch.randn(1, 2048), torch.randn(out_f, 2048)  # 1 x 2048 x out_f multiply-adds
    torch.testing.assert_close(layers._onednn_linear(a, b), a @ b.T, rtol=1e-5, atol=1e-3)
    assert bool(calls) == via_onednn


@pytest.mark.parametrize("vendor, machine, expected", [
    ("AuthenticAMD", "x86_64", "onednn"), ("HygonGenuine", "x86_64", "onednn"),
    ("GenuineIntel", "x86_64", "torch"), ("", "x86_64", "torch"), ("AuthenticAMD", "aarch64", "torch"),
])
def test_linear_backend_auto_follows_the_cpu(vendor, machine, expected, monkeypatch):
    monkeypatch.delenv("CNNLAB_LINEAR", raising=False)
    monkeypatch.setattr(runtime, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr("platform.machine", lambda: machine)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    assert runtime.linear_backend() == expected


def test_linear_backend_environment_override(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setenv("CNNLAB_LINEAR", "torch")
    assert runtime.linear_backend() == "torch"
    monkeypatch.setenv("CNNLAB_LINEAR", "onednn")
    assert runtime.linear_backend() == ("onednn" if torch.backends.mkldnn.is_available() else "torch")
    monkeypatch.setenv("CNNLAB_LINEAR", "mkl")
    with pytest.raises(ConfigError, match="CNNLAB_LINEAR must be one of auto, onednn, torch, got 'mkl'"):
        runtime.linear_backend()


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B45
flags\t\t: fpu vme

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B45
"""


def _fake_proc(monkeypatch, text: str | None) -> None:
    """Make runtime's open('/proc/cpuinfo') read ``text`` (None: the file is missing)."""
    def fake_open(path, *a, **kw):
        assert path == "/proc/cpuinfo"
        if text is None:
            raise FileNotFoundError(path)
        return io.StringIO(text)

    monkeypatch.setattr(runtime, "open", fake_open, raising=False)


def test_cpuinfo_reads_the_first_field_of_proc_cpuinfo(monkeypatch):
    _fake_proc(monkeypatch, CPUINFO)
    assert runtime.cpu_vendor() == "AuthenticAMD"
    assert runtime.cpuinfo("model name") == "AMD EPYC 9B45"
    assert runtime.cpuinfo("microcode") == ""


@pytest.mark.parametrize("text", [None, "processor\t: 0\nmodel name\t: some ARM core\n"])
def test_cpu_vendor_is_empty_when_unknown(monkeypatch, text):
    _fake_proc(monkeypatch, text)
    assert runtime.cpu_vendor() == ""


@needs_onednn
def test_onednn_linear_runs_under_inference_mode_and_exports_as_plain_linear():
    ref, fast = _pair(512, 256)
    x = torch.randn(8, 512)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-4)
    exported = torch.export.export(fast, (x,))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert ops == {"aten.linear.default"}, ops
    torch.testing.assert_close(exported.module()(x), ref(x), rtol=1e-5, atol=1e-4)
