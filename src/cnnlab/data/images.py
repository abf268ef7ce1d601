"""Image files and in-memory images -> uint8 tensors [C, H, W] of the size and channels a model expects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

MAX_PIXELS = 40_000_000  # refuse decompression bombs (~40 MP) with a clear error


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file, or raise DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise DataError(f"{path}: image too large ({im.width}x{im.height})")
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {str(e)[:100]})") from None


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert to 'L' or 'RGB'; transparent pixels become white, as they look on a page."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    return im.convert("L" if channels == 1 else "RGB")


def image_to_tensor(im: Image.Image, channels: int, size: tuple[int, int], invert: str = "auto",
                    centre: bool = False) -> torch.Tensor:
    """A PIL image as uint8 [channels, H, W], resized to ``size`` (H, W).

    Args:
        invert: 'auto' inverts grayscale images whose border is light (a dark digit on paper), so they look
            like MNIST (light digit on black); 'yes' always inverts, 'no' never.
        centre: grayscale only: frame the ink as MNIST frames its digits (``centre_digit``) instead of
            resizing the whole picture; for a digit drawn small or off-centre.
    """
    im = _to_mode(im, channels)
    if centre and channels == 1:
        arr = np.asarray(im, dtype=np.uint8)
        return torch.from_numpy(centre_digit(255 - arr if _inverts(arr, invert) else arr, size))[None]
    if im.size != (size[1], size[0]):
        shrink = min(im.size) > max(size)
        im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS if shrink else Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if invert == "yes" or (channels == 1 and _inverts(arr, invert)):
        arr = 255 - arr
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def centre_digit(arr: np.ndarray, size: tuple[int, int] = (28, 28), box: float = 20 / 28) -> np.ndarray:
    """MNIST's framing of a light-on-dark grayscale image [H, W] uint8 -> [size] uint8.

    As LeCun et al. built MNIST: the ink's bounding box is scaled to fit a 20x20 box (``box`` of the output)
    keeping its aspect ratio, then placed so that its centre of mass lies at the image centre. Ink is
    whatever is brighter than 10% of the brightest pixel; an image with no ink is only resized.
    """
    h, w = size
    peak = int(arr.max()) if arr.size else 0
    if peak == 0:
        return np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
    ys, xs = np.nonzero(arr > peak // 10)  # holds the peak pixel at least
    crop = arr[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    scale = box * min(h, w) / max(crop.shape)
    ch, cw = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR
    small = np.asarray(Image.fromarray(crop).resize((cw, ch), method), dtype=np.uint8)
    mass = small.astype(np.float64)
    total = mass.sum()
    if total > 0:
        cy = (mass.sum(1) * np.arange(ch)).sum() / total
        cx = (mass.sum(0) * np.arange(cw)).sum() / total
    else:
        cy, cx = (ch - 1) / 2, (cw - 1) / 2
    top, left = round((h - 1) / 2 - cy), round((w - 1) / 2 - cx)  # shift putting the centre of mass mid-image
    out = np.zeros((h, w), dtype=np.uint8)
    y0, x0 = max(top, 0), max(left, 0)  # the part of the digit that stays inside the frame
    y1, x1 = min(top + ch, h), min(left + cw, w)
    out[y0:y1, x0:x1] = small[y0 - top:y1 - top, x0 - left:x1 - left]
    return out


def _inverts(arr: np.ndarray, invert: str) -> bool:
    """Whether ``invert`` ('auto' | 'yes' | 'no') inverts this grayscale image: 'auto' when its border is light."""
    return invert == "yes" or (invert == "auto" and _border_mean(arr) > 127)


def _border_mean(arr: np.ndarray) -> float:
    return float(np.concatenate([arr[0].ravel(), arr[-1].ravel(), arr[:, 0].ravel(), arr[:, -1].ravel()]).mean())


def as_batch(images, channels: int, size: tuple[int, int], invert: str = "auto",
             centre: bool = False) -> torch.Tensor:
    """Paths, PIL images, numpy arrays (H,W[,C]; uint8 or float in [0,1]) or a tensor -> uint8 [N,C,H,W].

    A uint8 tensor [N,C,H,W] is taken as is; a float tensor is taken as values in [0, 1]. ``invert`` and
    ``centre`` are those of ``image_to_tensor`` and apply to images, not to tensors.
    """
    if isinstance(images, torch.Tensor):
        t = images if images.ndim == 4 else images[None]
        if t.shape[1] != channels:
            raise DataError(f"images have {t.shape[1]} channels, the model takes {channels}")
        return t if t.dtype == torch.uint8 else (t.clamp(0, 1) * 255).round().to(torch.uint8)
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        images = [images]
    out = []
    for item in images:
        if isinstance(item, (str, Path)):
            item = open_image(item)
        elif isinstance(item, np.ndarray):
            a = item if item.dtype == np.uint8 else (np.clip(item, 0, 1) * 255).round().astype(np.uint8)
            if a.ndim == 3 and a.shape[2] == 1:
                a = a[:, :, 0]
            if a.ndim not in (2, 3):
                raise DataError(f"an image array must be HxW or HxWxC, got shape {item.shape}")
            item = Image.fromarray(a)
        elif not isinstance(item, Image.Image):
            raise DataError(f"cannot use {type(item).__name__} as an image")
        out.append(image_to_tensor(item, channels, size, invert, centre))
    if not out:
        raise DataError("no images given")
    return torch.stack(out)
