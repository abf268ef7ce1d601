"""Small building blocks shared by the model definitions."""

from __future__ import annotations

import torch
from torch import nn


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
    was_training = features.training
    features.eval()
    with torch.no_grad():
        out = features(torch.zeros(1, *input_size))
    features.train(was_training)
    return out[0].numel()


def same_conv(in_ch: int, out_ch: int, k: int, bias: bool = True) -> nn.Conv2d:
    """Stride-1 convolution with TensorFlow 'SAME' padding (odd kernels): output H, W = input H, W."""
    return nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=bias)


def same_pool(k: int = 2) -> nn.MaxPool2d:
    """Max pooling k x k, stride k, TensorFlow 'SAME' rounding: output size ceil(H / k)."""
    return nn.MaxPool2d(k, k, ceil_mode=True)
