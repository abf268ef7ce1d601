"""Request payloads -> uint8 image batches [N, C, H, W] of the training shape, or a `BadRequest` with a status.

Accepted: an image file's bytes (PNG, JPEG, and the other formats in ``FORMATS``), or a JSON batch
``{"images": [...]}`` whose items are base64 image files (a ``data:`` URL prefix is allowed) or nested arrays
H x W (x C) of integers 0..255 or floats in [0, 1].

Decoding is in two steps so that a request's cost is known before it is paid: ``plan_*`` reads only the image
headers (PIL opens files lazily) and returns `Pending` images with their decoded pixel counts; the caller
checks those against its budgets; ``decode`` then decodes the images one at a time, each shrunk to the
model's input before the next is decoded, so a request never holds more than one full-size bitmap.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data import images as image_lib
from ..data.images import as_batch, image_to_tensor
from ..errors import CnnlabError
from .limits import BadRequest

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")  # only these decoders are ever tried on uploaded bytes
# Pillow's WebP decoder fills an RGBA frame buffer of its own before the image is built from it, so a WebP
# pixel holds about three times the memory of a PNG pixel while it decodes (benchmarks/serve_abuse.py).
DECODE_WEIGHT = {"WEBP": 3}

__all__ = ["FORMATS", "BadRequest", "Pending", "decode", "decode_file", "plan_file", "plan_json"]


@dataclass
class Pending:
    """One image of a request whose header has been read but whose pixels have not been decoded.

    Attributes:
        source: The image file's bytes, or an array image (already in memory: it came as JSON numbers).
        pixels: Pixels its decoding allocates (after any JPEG draft scaling).
        what: How error messages name it, e.g. 'upload' or 'images[3]'.
        weight: Its decoder's memory per pixel relative to a PNG's (see `DECODE_WEIGHT`).
    """

    source: bytes | np.ndarray
    pixels: int
    what: str
    weight: int = 1

    @property
    def cost(self) -> int:
        """What decoding it takes from the in-flight budget (units of one PNG-decoded pixel)."""
        return self.pixels * self.weight


def max_pixels() -> int:
    """The per-image pixel cap: the one `cnnlab predict` and folder training use, read at call time."""
    return image_lib.MAX_PIXELS


def open_lazily(data: bytes, what: str = "upload") -> Image.Image:
    """Read an image file's header only (no pixels), or raise BadRequest: 400 unreadable, 413 too large."""
    if not data:
        raise BadRequest(f"{what} is empty")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = im.size
    except Exception as e:  # noqa: BLE001 - PIL's format plugins raise many exception types on corrupt headers
        raise _unreadable(what, e) from None
    if width * height > max_pixels():
        im.close()
        raise BadRequest(f"{what}: image too large ({width}x{height} pixels, at most {max_pixels():,})", 413)
    return im


def _unreadable(what: str, e: Exception) -> BadRequest:
    if isinstance(e, Image.UnidentifiedImageError):
        return BadRequest(f"{what} is not an image in a supported format ({', '.join(FORMATS)})")
    if isinstance(e, Image.DecompressionBombError):
        return BadRequest(f"{what}: image too large ({str(e)[:100]})", 413)
    return BadRequest(f"{what} is not a readable image ({type(e).__name__}: {str(e)[:100]})")


def _draft(im: Image.Image, size: tuple[int, int], centre: bool) -> None:
    """Let the JPEG decoder scale down by 1/2, 1/4 or 1/8 while decoding (DCT scaling), keeping at least twice
    the model's input size (H, W) so the final resampling still has detail to work with. Framing a digit
    (``centre``) crops the ink first and needs the full resolution, so it is not drafted."""
    if im.format != "JPEG" or centre:
        return
    try:
        im.draft(None, (2 * size[1], 2 * size[0]))
    except Exception:  # noqa: BLE001, S110 - a header draft cannot use: decode at full size (within budget)
        pass


def plan_file(data: bytes, shape: tuple[int, int, int], centre: bool = False, what: str = "upload") -> list[Pending]:
    """One image file's bytes -> [Pending] (header read, pixels not decoded)."""
    with open_lazily(data, what) as im:
        _draft(im, tuple(shape[1:]), centre)  # the size it will decode at
        return [Pending(data, im.width * im.height, what, DECODE_WEIGHT.get(im.format, 1))]


def decode_file(data: bytes, size: tuple[int, int], centre: bool, what: str, resize: str = "stretch") -> Image.Image:
    """Fully decode one image file (already priced by `plan_file`) with the opener folder training and
    ``cnnlab predict`` use, so the server sees the same pixels: EXIF orientation applied, 16-bit and float images
    scaled, JPEGs drafted to the scale that covers ``size`` by ``resize`` (at most the planned pixels). The
    caller closes it (no copy is made: a copy would double the memory of the largest bitmap)."""
    try:
        return image_lib.open_image(data, max_pixels(), size=None if centre else size, resize=resize,
                                    formats=FORMATS, what=what)
    except image_lib.ImageTooLarge as e:
        raise BadRequest(str(e), 413) from None
    except CnnlabError as e:
        raise BadRequest(str(e)) from None


def _array_image(item, what: str) -> np.ndarray:
    try:
        a = np.asarray(item)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"{what}: rows of different lengths") from None
    if a.ndim not in (2, 3) or a.size == 0 or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise BadRequest(f"{what}: an array image must be H x W or H x W x C (C 1, 3 or 4), "
                         f"got shape {list(a.shape)}")
    if a.shape[0] * a.shape[1] > max_pixels():
        raise BadRequest(f"{what}: too many pixels", 413)
    if a.dtype.kind in "iu":
        if a.min() < 0 or a.max() > 255:
            raise BadRequest(f"{what}: integer pixels must be in 0..255")
        return a.astype(np.uint8)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise BadRequest(f"{what}: float pixels must be in [0, 1]")
        return a.astype(np.float32)
    raise BadRequest(f"{what}: pixels must be numbers")


def _b64_file(item: str, what: str) -> bytes:
    if item.startswith("data:"):
        item = item.partition(",")[2]
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64") from None


def plan_json(payload, shape: tuple[int, int, int], max_images: int, centre: bool = False) -> list[Pending]:
    """A parsed JSON body ``{"images": [...]}`` -> its images as `Pending` (headers read, nothing decoded)."""
    if not isinstance(payload, dict) or "images" not in payload:
        raise BadRequest('JSON body must be an object {"images": [...]} (base64 image files or pixel arrays)')
    items = payload["images"]
    if not isinstance(items, list) or not items:
        raise BadRequest('"images" must be a non-empty list')
    if len(items) > max_images:
        raise BadRequest(f"too many images in one request ({len(items)}, at most {max_images})", 413)
    pending: list[Pending] = []
    for i, item in enumerate(items):
        what = f"images[{i}]"
        if isinstance(item, str):
            pending += plan_file(_b64_file(item, what), shape, centre, what)
        elif isinstance(item, list):
            a = _array_image(item, what)
            pending.append(Pending(a, a.shape[0] * a.shape[1], what))
        else:
            raise BadRequest(f"{what} must be a base64 string or a nested list of pixels")
    return pending


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IHDR_HEAD = PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR"  # a PNG's first chunk: IHDR, 13 bytes long
PLAIN_PNG_BYTES = 64 * 1024  # larger files go through PIL's reader, which reads their data without a copy
PLAIN_PNG_MODES = {0: "L", 2: "RGB"}  # PNG colour type -> PIL mode (and raw mode) at 8 bits per sample
_CHUNK_HEAD = struct.Struct(">I4s")  # a chunk's data length and type
_IHDR = struct.Struct(">IIBBBBB")  # width, height, bit depth, colour type, compression, filter, interlace


def plain_png(data: bytes) -> Image.Image | None:
    """A small PNG that holds nothing but its pixels, decoded by PIL's own PNG data decoder without the cost of
    opening the file (most of a small PNG's decoding time); None for any other file, which the caller decodes
    with `decode_file`.

    "Nothing but its pixels": the chunks are IHDR, then one or more IDAT, then IEND at the end of the file, all
    with valid checksums; 8-bit grayscale or RGB, not interlaced. Such a file carries no palette, transparency,
    orientation (EXIF or XMP) or any other chunk PIL would read, so `decode_file` would return the same pixels
    in the same mode; whatever this path cannot decode (a broken data stream, too little data) it leaves to
    `decode_file`, which then names the error as it always has.
    """
    if len(data) > PLAIN_PNG_BYTES or not data.startswith(PNG_IHDR_HEAD):
        return None
    if zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big"):  # IHDR's type and data, then its checksum
        return None
    width, height, depth, colour, compression, filtering, interlace = _IHDR.unpack_from(data, 16)
    mode = PLAIN_PNG_MODES.get(colour)
    if mode is None or depth != 8 or compression or filtering or interlace or not 0 < width * height <= max_pixels():
        return None
    parts, pos, end = [], 33, len(data)
    while True:  # IDAT chunks up to an empty IEND that ends the file
        if pos + 12 > end:
            return None
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        stop = pos + 12 + length
        if stop > end or zlib.crc32(data[pos + 4:stop - 4]) != int.from_bytes(data[stop - 4:stop], "big"):
            return None
        if kind == b"IEND":
            if length or stop != end or not parts:
                return None
            break
        if kind != b"IDAT":
            return None
        parts.append(data[pos + 8:stop - 4])
        pos = stop
    try:
        return Image.frombytes(mode, (width, height), parts[0] if len(parts) == 1 else b"".join(parts), "zip", mode)
    except (ValueError, OSError):  # too little data or a broken stream: decode_file says which, as before
        return None


def _gray_tensor(im: Image.Image, invert: str) -> torch.Tensor:
    """`image_to_tensor` of a grayscale image already at the model's size: uint8 [1, H, W], inverted by the same
    rule, without the copies of the general path (a small image's conversion costs about as much as its decoding).

    'auto' inverts when the mean of the border (top and bottom rows, left and right columns, corners counted
    twice) is over 127, as `cnnlab.data.images` decides; the mean is taken of the bytes (exact integers, one
    correctly rounded division, so the same number numpy's mean gives) instead of four numpy slices.
    """
    raw, (w, h) = im.tobytes(), im.size
    if invert == "auto":
        border = sum(raw[:w]) + sum(raw[-w:]) + sum(raw[::w]) + sum(raw[w - 1::w])
        flip = border / (2 * (w + h)) > 127
    else:
        flip = invert == "yes"
    arr = np.frombuffer(bytearray(raw), np.uint8).reshape(1, h, w)
    if flip:
        np.subtract(255, arr, out=arr)
    return torch.from_numpy(arr)


def decode(pending: list[Pending], shape: tuple[int, int, int], invert: str, centre: bool = False,
           resize: str = "stretch", interpolation: str = "bilinear") -> torch.Tensor:
    """Decode the planned images one by one into uint8 [N, C, H, W] with ``shape`` = (C, H, W), resized as the
    run recorded (``resize``: 'stretch' or 'shorter-crop'; ``interpolation``: its filter), as `cnnlab predict`
    prepares them."""
    size = tuple(shape[1:])
    out = []
    for p in pending:
        # Each image is decoded and shrunk to the model's input before the next one is decoded.
        image = p.source if isinstance(p.source, np.ndarray) else plain_png(p.source)
        plain = image is not None and not isinstance(image, np.ndarray)
        if image is None:
            image = decode_file(p.source, size, centre, p.what, resize)
        try:
            if isinstance(image, np.ndarray):
                out.append(as_batch(image, shape[0], size, invert, centre, resize=resize,
                                    interpolation=interpolation)[0])
            elif plain and shape[0] == 1 and not centre and image.mode == "L" and image.size == size[::-1]:
                out.append(_gray_tensor(image, invert))
                # Only as large as the model's input: its bitmap goes with its last reference, just below (close()
                # would cost about as much again as the whole conversion).
                image = None
            else:
                out.append(image_to_tensor(image, shape[0], size, invert, centre, resize=resize,
                                           interpolation=interpolation))
        except CnnlabError as e:
            raise BadRequest(f"{p.what}: {e}") from None
        except (ValueError, OSError) as e:  # a mode PIL cannot convert
            raise _unreadable(p.what, e) from None
        finally:
            if isinstance(image, Image.Image):
                image.close()  # frees the full-size bitmap now, not at the next garbage collection
    return out[0][None] if len(out) == 1 else torch.stack(out)
