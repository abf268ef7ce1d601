"""Batched, per-sample image transforms on float tensors [N, C, H, W] in [0, 1].

Every random transform takes a ``torch.Generator`` so that a run is reproducible from its seed and
step alone (resume needs no augmentation state). Colour transforms follow ``tf.image.random_*``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def fit_to_size(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre-crop or zero-pad [N, C, H, W] to ``size`` (H, W), as tf.image.resize_image_with_crop_or_pad."""
    h, w = x.shape[-2:]
    th, tw = size
    if (h, w) == (th, tw):
        return x
    if h > th or w > tw:  # crop the centre (where larger)
        top, left = max(0, (h - th) // 2), max(0, (w - tw) // 2)
        x = x[..., top:top + min(h, th), left:left + min(w, tw)]
        h, w = x.shape[-2:]
    if h < th or w < tw:  # pad evenly with zeros (where smaller)
        ph, pw = th - h, tw - w
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return x


def _crop_at(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop each sample n at (top[n], left[n]) to ``size``; one gather for the whole batch."""
    n, c = x.shape[:2]
    th, tw = size
    rows = (top[:, None] + torch.arange(th, device=x.device))[:, None, :, None]  # [N,1,th,1]
    cols = (left[:, None] + torch.arange(tw, device=x.device))[:, None, None, :]  # [N,1,1,tw]
    bi = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return x[bi, ci, rows, cols]


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def random_crop(x: torch.Tensor, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Random crop of ``size`` from each sample (as tf.random_crop); smaller images are padded first."""
    h, w = x.shape[-2:]
    if h < size[0] or w < size[1]:
        x = fit_to_size(x, (max(h, size[0]), max(w, size[1])))
        h, w = x.shape[-2:]
    n = x.shape[0]
    top = torch.randint(0, h - size[0] + 1, (n,), generator=gen).to(x.device)
    left = torch.randint(0, w - size[1] + 1, (n,), generator=gen).to(x.device)
    return _crop_at(x, top, left, size)


def random_resized_crop(x: torch.Tensor, size: tuple[int, int], scale: tuple[float, float], gen: torch.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop, batched: from each sample a crop of a random fraction ``scale`` of its
    area and aspect ratio (log-uniform in ``ratio``), at a random place, resized (bilinear) to ``size``.

    Where torchvision retries draws that do not fit, the crop's sides are clipped to the image's, so the
    number of generator draws is fixed (four per sample) and a step's crops depend only on its generator.
    """
    n, _, h, w = x.shape
    area = _uniform(n, *scale, gen) * h * w
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen)
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).clamp(1, w)
    ch = torch.sqrt(area / r).clamp(1, h)
    left = torch.rand(n, generator=gen) * (w - cw)
    top = torch.rand(n, generator=gen) * (h - ch)
    # An affine grid per sample mapping the output onto its crop, in grid_sample's [-1, 1] coordinates.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cw / w
    theta[:, 1, 1] = ch / h
    theta[:, 0, 2] = (left + cw / 2) / w * 2 - 1
    theta[:, 1, 2] = (top + ch / 2) / h * 2 - 1
    grid = F.affine_grid(theta.to(x.device, x.dtype), [n, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def translate(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each sample by up to ``pixels`` in x and y, filling from a reflection of the border."""
    if pixels <= 0:
        return x
    padded = F.pad(x, (pixels,) * 4, mode="reflect")
    return random_crop(padded, tuple(x.shape[-2:]), gen)


def flip(x: torch.Tensor, gen: torch.Generator, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror each sample left-right with probability 1/2 (or where ``mask`` [N] is true: no draw)."""
    if mask is None:
        mask = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] RGB in [0,1] -> HSV with hue in [0,1)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] HSV (hue in [0,1)) -> RGB."""
    h, s, v = x.unbind(1)
    k = torch.stack(((5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6), 1)  # [N,3,H,W]
    f = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[:, None] - (v * s)[:, None] * f


def adjust_hsv(x: torch.Tensor, hue_shift: torch.Tensor, sat_factor: torch.Tensor) -> torch.Tensor:
    """Shift hue by ``hue_shift[n]`` (fraction of the circle) and scale saturation by ``sat_factor[n]``."""
    hsv = rgb_to_hsv(x)
    h = (hsv[:, 0] + hue_shift[:, None, None]) % 1.0
    s = (hsv[:, 1] * sat_factor[:, None, None]).clamp(0, 1)
    return hsv_to_rgb(torch.stack((h, s, hsv[:, 2]), 1))


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero a random ``size`` x ``size`` square (centre anywhere in the image) in each sample."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=gen).to(x.device)
    cx = torch.randint(0, w, (n,), generator=gen).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys - cy[:, None, None]).abs() <= size // 2) & ((xs - cx[:, None, None]).abs() <= size // 2)
    return x * (~inside)[:, None].to(x.dtype)


@dataclass(frozen=True)
class Augment:
    """The training-time transform a config asks for, applied in the CIFAR tutorial's order:
    crop (or random-resized crop), flip, hue, contrast, brightness, saturation, clip; then translate and cutout."""

    size: tuple[int, int]  # model input (H, W)
    random_crop: bool = False
    translate: int = 0
    flip: bool = False
    hue: float = 0.0
    brightness: float = 0.0
    contrast: tuple[float, float] = (1.0, 1.0)
    saturation: tuple[float, float] = (1.0, 1.0)
    cutout: int = 0
    resized_crop: tuple[float, float] = (0.0, 0.0)  # RandomResizedCrop's area range; (0, 0): off

    def __post_init__(self) -> None:
        # Shifts reflect the image across its border, and a reflection is at most one pixel less than the side
        # it mirrors: a larger translate would fail at the first step.
        h, w = self.size
        if self.translate > min(h, w) - 1:
            raise ConfigError(f"translate={self.translate} is too large for the model's {h}x{w} input: "
                              f"at most {min(h, w) - 1} pixels")

    @classmethod
    def from_config(cls, config, size: tuple[int, int]) -> Augment:
        return cls(size=size, random_crop=config.random_crop, translate=config.translate, flip=config.flip,
                   hue=config.hue, brightness=config.brightness, contrast=tuple(config.contrast),
                   saturation=tuple(config.saturation), cutout=config.cutout,
                   resized_crop=tuple(getattr(config, "random_resized_crop", (0.0, 0.0))))

    def __call__(self, x: torch.Tensor, gen: torch.Generator, flip_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Augment the float batch ``x`` with draws from ``gen``; with ``flip_mask`` ([N] bool, e.g.
        `AlternatingFlip`'s), ``flip`` mirrors those samples instead of drawing."""
        n = x.shape[0]
        if self.resized_crop != (0.0, 0.0):
            x = random_resized_crop(x, self.size, self.resized_crop, gen)
        elif self.random_crop:
            x = random_crop(x, self.size, gen)
        else:
            x = fit_to_size(x, self.size)
        if self.flip:
            x = flip(x, gen, flip_mask)
        colour = x.shape[1] == 3
        hue = _uniform(n, -self.hue, self.hue, gen).to(x.device) if self.hue and colour else None
        if self.contrast != (1.0, 1.0):
            f = _uniform(n, *self.contrast, gen).to(x.device)[:, None, None, None]
            mean = x.mean(dim=(2, 3), keepdim=True)  # per image and channel, as tf.image.adjust_contrast
            x = (x - mean) * f + mean
        if self.brightness:
            x = x + _uniform(n, -self.brightness, self.brightness, gen).to(x.device)[:, None, None, None]
        sat = _uniform(n, *self.saturation, gen).to(x.device) if self.saturation != (1.0, 1.0) and colour else None
        if hue is not None or sat is not None:
            ones, zeros = torch.ones(n, device=x.device), torch.zeros(n, device=x.device)
            x = adjust_hsv(x.clamp(0, 1), hue if hue is not None else zeros, sat if sat is not None else ones)
        x = x.clamp(0, 1)
        if self.translate:
            x = translate(x, self.translate, gen)
        if self.cutout:
            x = cutout(x, self.cutout, gen)
        return x

    @property
    def active(self) -> bool:
        """True when any random transform is on."""
        return bool(self.random_crop or self.resized_crop != (0.0, 0.0) or self.translate or self.flip or self.hue
                    or self.brightness
                    or self.contrast != (1.0, 1.0) or self.saturation != (1.0, 1.0) or self.cutout)
