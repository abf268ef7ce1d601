"""Modern fast nets for the speed records (BatchNorm, GELU, max pooling; airbench-style for CIFAR-10).

Compared with the tutorial nets they reach higher accuracy in far fewer FLOPs: BatchNorm lets them train at large
learning rates, and global / late pooling keeps the dense head tiny.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError
from .registry import CnnModel, ModelMeta, register_model


def conv_bn(in_ch: int, out_ch: int, bn_momentum: float = 0.1, act: type[nn.Module] = nn.GELU) -> list[nn.Module]:
    """3x3 SAME convolution without bias (BatchNorm's shift replaces it), BatchNorm, ``act`` (GELU)."""
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch, momentum=bn_momentum),
            act()]


class Scale(nn.Module):
    """Multiply by a constant (airbench scales its logits by 1/9 to tame the initial loss)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
STEMS = ("pool", "patch")


@register_model("mnist-fast", description="3 x (conv3x3-maxpool-BN-GELU) -> global max pool -> fc")
def mnist_fast(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, c1: int = 24, c2: int = 48,
               c3: int = 96, convs: int | list[int] = 1, stem: str = "pool", act: str = "gelu") -> CnnModel:
    """A small BN/GELU net for MNIST-sized inputs: 28 -> 14 -> 7 -> 3 -> global max pool.

    With the default widths ~4.2 M multiply-adds per image, 1/3 of the tf.estimator CNN; the ``mnist-fast``
    recipe trains it for 0.4 epoch (accuracy and time in docs/speed.md).

    Args:
        convs: Convolutions per stage. Each one past the first is a conv-BN-GELU at the pooled size (airbench's
            block), so it deepens the net at a quarter of the first convolution's cost per channel pair. A list of
            three gives each stage its own count (the first stage's extra convolution is the costliest per
            multiply-add on a CPU: 16 channels at 14 x 14).
        stem: How the first stage halves the image. "pool": a 3x3 convolution at full size, then max pooling.
            "patch": each 2x2 patch of pixels becomes the channels of one position (pixel unshuffle), then a 3x3
            convolution at half size. Both cost the same multiply-adds, but "patch" never writes, pools or
            back-propagates a full-size activation, which dominate the first stage's time on a CPU.
        act: "gelu" or "relu" (cheaper on a CPU, where these narrow layers are bound by memory traffic).
    """
    per_stage = [convs] * 3 if isinstance(convs, int) else list(convs)
    if any(not isinstance(n, int) or n < 1 for n in per_stage):
        raise ModelError(f"mnist-fast: convs must be >= 1, got {convs}")
    if len(per_stage) != 3:
        raise ModelError(f"mnist-fast: convs must be one count or a list of three (one per stage), got {convs}")
    if stem not in STEMS:
        raise ModelError(f"mnist-fast: stem must be one of {', '.join(STEMS)}, got {stem!r}")
    if act not in ACTIVATIONS:
        raise ModelError(f"mnist-fast: act must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
    activation = ACTIVATIONS[act]

    def extra(o: int, n: int) -> list[nn.Module]:
        return [layer for _ in range(n - 1) for layer in conv_bn(o, o, act=activation)]

    def block(i: int, o: int, n: int) -> list[nn.Module]:
        # Pool straight after the convolution (as airbench does): BatchNorm and GELU then touch 4x fewer values.
        deeper = extra(o, n)  # built first, as before these options: the same seed draws the same weights
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(o), activation(),
                *deeper]

    if stem == "patch":
        first = [nn.PixelUnshuffle(2), nn.Conv2d(4 * in_chans, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1),
                 activation(), *extra(c1, per_stage[0])]
    else:
        first = block(in_chans, c1, per_stage[0])
    features = nn.Sequential(
        *first,  # [N,c1,14,14]
        *block(c1, c2, per_stage[1]),  # [N,c2,7,7]
        *block(c2, c3, per_stage[2]),  # [N,c3,3,3]
    )
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c3, num_classes))
    meta = ModelMeta(name="mnist-fast", input_size=(in_chans, img_size, img_size), num_classes=num_classes)
    return CnnModel(features, head, meta)


class Whiten(nn.Conv2d):
    """2x2 patch-whitening convolution (airbench): weights set from the data's patch covariance, then frozen.

    Its ``init_from_data`` sets the filters to the covariance eigenvectors scaled by 1/sqrt(eigenvalue), in +/- pairs,
    so the first layer sees decorrelated, unit-variance inputs from the first step.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, kernel_size=2, padding=0, bias=True)
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """images: float [N, C, H, W] in [0, 1] (a few thousand training images suffice)."""
        c, k = images.shape[1], self.kernel_size[0]
        patches = images.unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c * k * k).double()
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evecs = evecs.T.flip(0)[: self.out_channels // 2]  # strongest directions first
        evals = evals.flip(0)[: self.out_channels // 2]
        w = (evecs / torch.sqrt(evals[:, None] + eps)).reshape(-1, c, k, k)  # [out/2, C, k, k]; eigh layout c,k,k
        self.weight.copy_(torch.cat((w, -w)).to(self.weight.dtype))


@register_model("airbench", description="whiten 2x2 -> 3 x (conv-pool-BN-GELU-conv-BN-GELU) -> pool -> fc/9")
def airbench(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, w1: int = 64, w2: int = 256,
             w3: int = 256, bn_momentum: float = 0.4, dirac: bool = False, bn_scale: bool = True) -> CnnModel:
    """The airbench94 CIFAR-10 network (Keller Jordan, 2024, https://github.com/KellerJordan/cifar10-airbench)
    with configurable widths.

    airbench94 uses widths 64/256/256; smaller widths trade accuracy for CPU time.

    Args:
        dirac: Start each 3x3 convolution's first min(in, out) output channels as copies of its input channels
            (``dirac_``), an implicit residual connection at initialisation, as airbench94 does.
        bn_scale: Train the batch norms' scales. airbench94 keeps them at 1 and trains only their shifts.
    """
    wh = 2 * in_chans * 4  # both signs of every eigen-direction of a 2x2 patch
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.MaxPool2d(2),
                nn.BatchNorm2d(o, momentum=bn_momentum), nn.GELU(), *conv_bn(o, o, bn_momentum)]

    features = nn.Sequential(
        Whiten(in_chans, wh), nn.GELU(),  # [N,24,31,31]
        *block(wh, w1),  # [N,w1,15,15]
        *block(w1, w2),  # [N,w2,7,7]
        *block(w2, w3),  # [N,w3,3,3]
    )
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w3, num_classes, bias=False), Scale(1 / 9))
    for m in features.modules():
        if dirac and isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            with torch.no_grad():
                nn.init.dirac_(m.weight[:m.in_channels])
        if not bn_scale and isinstance(m, nn.BatchNorm2d):
            m.weight.requires_grad_(False)  # stays 1 (the state dict still holds it, so checkpoints load as before)
    meta = ModelMeta(name="airbench", input_size=(in_chans, img_size, img_size), num_classes=num_classes)
    return CnnModel(features, head, meta)
