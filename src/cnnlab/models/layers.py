"""Small building blocks shared by the model definitions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..modes import eval_mode


def tf_init_(module: nn.Module) -> nn.Module:
    """Initialise like TensorFlow's defaults: Glorot-uniform kernels, zero biases.

    The tutorials train with plain SGD at small learning rates, where the starting scale matters;
    PyTorch's default (Kaiming-uniform with a=sqrt(5)) starts ~2.5x smaller and trains slower.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def flat_features(features: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Length of the flattened output of ``features`` for one input of shape (C, H, W)."""
    with eval_mode(features), torch.no_grad():
        out = features(torch.zeros(1, *input_size))
    return out[0].numel()


def same_conv(in_ch: int, out_ch: int, k: int, bias: bool = True) -> nn.Conv2d:
    """Stride-1 convolution with TensorFlow 'SAME' padding (odd kernels): output H, W = input H, W."""
    return nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=bias)


def same_pool(k: int = 2) -> nn.MaxPool2d:
    """Max pooling k x k, stride k, TensorFlow 'SAME' rounding: output size ceil(H / k)."""
    return nn.MaxPool2d(k, k, ceil_mode=True)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the mask drawn as ``uniform >= p``: the same distribution, faster on CPU.

    PyTorch's CPU dropout draws its mask with ``bernoulli_``, which is not vectorised; ``torch.rand`` and a
    compare are (what that buys a training step: docs/speed.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0
        keep = torch.rand(x.shape, device=x.device) >= self.p  # [same as x], P(keep) = 1 - p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def pool_before_relu(module: nn.Module) -> int:
    """Swap every ``ReLU -> MaxPool2d`` pair inside ``nn.Sequential`` containers to ``MaxPool2d -> ReLU``, in place.

    ReLU is monotone, so max-pool and ReLU commute: the outputs are bit-identical and so are the gradients
    (both orders send a window's gradient to its largest input, and zero it when that input is <= 0). Pooling
    first runs the ReLU and its backward on a quarter of the values (what that buys on CPU: docs/speed.md).
    Only parameter-free modules move, so state-dict keys do not change. Pools with padding are left alone (their
    -inf padding does not commute with ReLU). Returns the number of pairs swapped.
    """
    swapped = 0
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:]):
            act, pool = seq._modules[a], seq._modules[b]
            if (type(act) is nn.ReLU and type(pool) is nn.MaxPool2d and pool.padding in (0, (0, 0))
                    and not act.inplace):
                seq._modules[a], seq._modules[b] = pool, act
                swapped += 1
    return swapped


# Products smaller than this many multiply-adds stay with torch: oneDNN's fixed cost per call outweighs its speed.
ONEDNN_MIN_MACS = 1 << 21


def _onednn_linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T + bias`` for fp32 [M, K] and [N, K] (either may be a transposed view), through oneDNN when large."""
    if a.shape[0] * a.shape[1] * b.shape[0] >= ONEDNN_MIN_MACS:
        return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")
    return F.linear(a, b, bias)


class _OneDnnLinearFn(torch.autograd.Function):
    """y = x W^T + b with all three products (forward, input and weight gradients) through oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        gx = _onednn_linear(grad, weight.t()) if ctx.needs_input_grad[0] else None  # [M,N] @ [N,K]
        gw = _onednn_linear(grad.t(), x.t()) if ctx.needs_input_grad[1] else None  # [N,M] @ [M,K]
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _exporting() -> bool:
    """Traced, compiled or exported (ONNX, torch.export): those want the plain aten graph of ``nn.Linear``."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


class OneDnnLinear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU products run through oneDNN rather than torch's BLAS (see
    ``cnnlab.runtime.linear_backend`` for when that pays, docs/speed.md for the figures). Same parameters and
    state dict; other dtypes, devices, autocast regions and tracing / export take ``nn.Linear``'s own path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype is torch.float32 and self.weight.dtype is torch.float32 and x.device.type == "cpu"
                and not torch.is_autocast_enabled("cpu") and not _exporting()):
            y = _OneDnnLinearFn.apply(x.reshape(-1, self.in_features), self.weight, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        return super().forward(x)


def use_onednn_linear(module: nn.Module, backend: str | None = None) -> int:
    """Turn every plain ``nn.Linear`` in ``module`` into an ``OneDnnLinear``, in place, when the backend is 'onednn'.

    ``backend`` defaults to ``cnnlab.runtime.linear_backend()`` (the machine's choice, or ``CNNLAB_LINEAR``).
    Parameters, state-dict keys and outputs stay the same (up to fp32 rounding). Returns the number of layers
    changed.
    """
    from ..runtime import linear_backend

    if (backend or linear_backend()) != "onednn":
        return 0
    changed = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDnnLinear
            changed += 1
    return changed
