"""Request payloads -> uint8 image batches [N, C, H, W] of the training shape, or a `BadRequest` with a status.

Accepted: an image file's bytes (PNG, JPEG, and the other formats in ``FORMATS``), or a JSON batch
``{"images": [...]}`` whose items are base64 image files (a ``data:`` URL prefix is allowed) or nested arrays
H x W (x C) of integers 0..255 or floats in [0, 1].
"""

from __future__ import annotations

import base64
import binascii

import numpy as np
import torch
from PIL import Image

from ..data.images import ImageTooLarge, as_batch, image_to_tensor, open_image
from ..errors import CnnlabError, DataError

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")  # only these decoders are ever tried on uploaded bytes
# Per image, stricter than the training cap: every request decodes in the server's memory.
MAX_PIXELS = 25_000_000


class BadRequest(CnnlabError):
    """A client error: answered with ``status`` and the message, never a 500."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def open_upload(data: bytes, what: str = "upload") -> Image.Image:
    """Decode an uploaded image file fully with the training opener, or raise BadRequest (400/413) saying why."""
    if not data:
        raise BadRequest(f"{what} is empty")
    try:
        return open_image(data, MAX_PIXELS, formats=FORMATS, what=what)
    except ImageTooLarge as e:
        raise BadRequest(str(e), 413) from None
    except DataError as e:
        raise BadRequest(str(e)) from None


def image_file_batch(data: bytes, shape: tuple[int, int, int], invert: str, centre: bool = False) -> torch.Tensor:
    """One image file -> uint8 [1, C, H, W] with ``shape`` = (C, H, W)."""
    im = open_upload(data)
    return image_to_tensor(im, shape[0], tuple(shape[1:]), invert, centre)[None]


def _array_image(item, index: int) -> np.ndarray:
    try:
        a = np.asarray(item)
    except ValueError:
        raise BadRequest(f"images[{index}]: rows of different lengths") from None
    if a.ndim not in (2, 3) or a.size == 0 or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise BadRequest(f"images[{index}]: an array image must be H x W or H x W x C (C 1, 3 or 4), "
                         f"got shape {list(a.shape)}")
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise BadRequest(f"images[{index}]: too many pixels", 413)
    if a.dtype.kind in "iu":
        if a.min() < 0 or a.max() > 255:
            raise BadRequest(f"images[{index}]: integer pixels must be in 0..255")
        return a.astype(np.uint8)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise BadRequest(f"images[{index}]: float pixels must be in [0, 1]")
        return a.astype(np.float32)
    raise BadRequest(f"images[{index}]: pixels must be numbers")


def _b64_image(item: str, index: int) -> Image.Image:
    if item.startswith("data:"):
        item = item.partition(",")[2]
    try:
        data = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"images[{index}] is not valid base64") from None
    return open_upload(data, f"images[{index}]")


def json_batch(payload, shape: tuple[int, int, int], invert: str, max_images: int,
               centre: bool = False) -> torch.Tensor:
    """A parsed JSON body ``{"images": [...]}`` -> uint8 [N, C, H, W]."""
    if not isinstance(payload, dict) or "images" not in payload:
        raise BadRequest('JSON body must be an object {"images": [...]} (base64 image files or pixel arrays)')
    items = payload["images"]
    if not isinstance(items, list) or not items:
        raise BadRequest('"images" must be a non-empty list')
    if len(items) > max_images:
        raise BadRequest(f"too many images in one request ({len(items)}, at most {max_images})", 413)
    decoded = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            decoded.append(_b64_image(item, i))
        elif isinstance(item, list):
            decoded.append(_array_image(item, i))
        else:
            raise BadRequest(f"images[{i}] must be a base64 string or a nested list of pixels")
    try:
        return as_batch(decoded, shape[0], tuple(shape[1:]), invert, centre)
    except CnnlabError as e:
        raise BadRequest(str(e)) from None
