"""Image files and in-memory images -> uint8 tensors [C, H, W] of the size and channels a model expects.

One opener, `open_image`, is used by folder training, ``predict`` and the server, so a file reaches the model as
the same pixels whichever command reads it: EXIF orientation applied, palette and odd modes converted, 16-bit
and float images scaled (not clipped) to 8 bits, JPEGs decoded at a reduced scale (``draft``) when the target
size allows it.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

try:  # libjpeg-turbo without PIL's Python header parser, decoding with the GIL released; PIL when it is missing
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel
    simplejpeg = None

# Refuse decompression bombs before decoding: a few KB of PNG can claim gigapixels. One cap for every command.
MAX_PIXELS = 40_000_000
RESIZES = ("stretch", "shorter-crop")
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ORIENTATION = 0x0112  # EXIF tag; values 5..8 swap width and height
_ORIENTATION_SOURCES = ("exif", "xmp", "XML:com.adobe.xmp")  # where PIL finds it (getexif reads XMP's too)
_JPEGS = ("JPEG", "MPO")  # MPO: a phone's JPEG with extra frames (depth, preview); decoded as a JPEG
_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_SOI = b"\xff\xd8\xff"  # a JPEG file's first bytes
_TRANSPOSES = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the turn that undoes it, as ImageOps.exif_transpose


# Images past PIL's own threshold are refused by MAX_PIXELS before decoding, so PIL's multi-line warning about
# them is noise on stderr (and names absolute paths).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageTooLarge(DataError):
    """An image whose header claims more pixels than the cap; refused before decoding."""


def decoder_versions() -> dict[str, str]:
    """The decoders' versions, for keys of decoded caches: a new libjpeg may round a pixel differently."""
    return {"pil": PIL.__version__, "simplejpeg": getattr(simplejpeg, "__version__", "none")}


def open_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS, *, size: tuple[int, int] | None = None,
               resize: str = "stretch", formats: tuple[str, ...] | None = None, what: str | None = None) -> Image.Image:
    """Open and fully decode an image file or file bytes, ready for `image_to_tensor`.

    Args:
        source: A path, or the bytes of an image file.
        max_pixels: Images whose header claims more pixels are refused (ImageTooLarge) before decoding.
        size: The (H, W) the image will be brought to: a JPEG is then decoded at the smallest DCT scale
            (1/2, 1/4, 1/8) that still covers it, so a phone photo costs a fraction of a full decode.
        resize: How it will be brought to ``size`` ('stretch' or 'shorter-crop'); decides what "covers" means.
        formats: Only these PIL decoders are tried (None: all).
        what: How to name the image in errors (default: the path, or 'image').

    Returns:
        An image in mode 'L', 'LA', 'RGB' or 'RGBA', EXIF orientation applied, 8 bits per channel.

    Raises:
        DataError: Missing or unreadable file (ImageTooLarge: over ``max_pixels``); one line naming it.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        what, stream = what or "image", bytes(source)
    else:
        what, stream = what or str(source), _jpeg_bytes(source)
    if isinstance(stream, bytes):
        if simplejpeg is not None and stream[:3] == _SOI and (formats is None or "JPEG" in formats):
            fast = _turbo_jpeg(stream, size, resize, max_pixels, what)
            if fast is not None:
                return fast
        stream = io.BytesIO(stream)
    try:
        im = Image.open(stream, formats=formats)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):  # no stat first: one syscall less per file
        raise DataError(f"image not found: {source}") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{what}: image too large (at most {max_pixels:,} pixels)") from None
    except UnidentifiedImageError:
        kinds = ", ".join(formats) if formats else "a format PIL reads"
        raise DataError(f"{what}: not an image in a supported format ({kinds})") from None
    except _ERRORS as e:
        raise DataError(f"{what}: not a readable image ({type(e).__name__}: {str(e)[:100]})") from None
    # Not a `with` block: closing would free the decoded bitmap, and a copy would double the largest one.
    try:
        if im.width * im.height > max_pixels:
            raise ImageTooLarge(f"{what}: image too large ({im.width}x{im.height} pixels, at most {max_pixels:,})")
        jpeg = im.format in _JPEGS
        # A JPEG's orientation can only come from its EXIF or XMP block, both read with the header: without
        # them, reading the (empty) orientation twice is skipped, a per-file cost paid while holding the GIL.
        oriented = not jpeg or any(k in im.info for k in _ORIENTATION_SOURCES)
        if size is not None and jpeg:
            im.draft(im.mode, _draft_request(im, size, resize, oriented))
        im.load()
        if oriented:
            ImageOps.exif_transpose(im, in_place=True)
        return _eight_bit(im)
    except ImageTooLarge:
        im.close()
        raise
    except _ERRORS as e:
        im.close()
        raise DataError(f"{what}: not a readable image ({type(e).__name__}: {str(e)[:100]})") from None


def _draft_request(im: Image.Image, size: tuple[int, int], resize: str, oriented: bool = True) -> tuple[int, int]:
    """The (W, H) a JPEG draft must keep at least, in the file's own (un-rotated) orientation.

    ``oriented``: whether the file may say it is turned (False: it has no EXIF or XMP block).
    """
    try:
        turned = oriented and im.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
    except (AttributeError, TypeError, ValueError, OSError, SyntaxError, struct.error):
        turned = False  # a broken EXIF block only costs the draft
    return _draft_need(im.width, im.height, size, resize, turned)


def _draft_need(width: int, height: int, size: tuple[int, int], resize: str, turned: bool) -> tuple[int, int]:
    """The (W, H) a ``width`` x ``height`` JPEG must keep at least to be brought to ``size`` (H, W) by
    ``resize``, in the file's own orientation (``turned``: its EXIF orientation swaps width and height)."""
    h, w = size
    iw, ih = (height, width) if turned else (width, height)
    if resize == "shorter-crop":  # the shorter side scales to cover size: both sides at least that scale
        k = max(h / ih, w / iw)
        need = (math.ceil(iw * k), math.ceil(ih * k))
    else:
        need = (w, h)
    return (need[1], need[0]) if turned else need


def _draft_scale(width: int, height: int, need: tuple[int, int]) -> int:
    """The DCT scale denominator (8, 4, 2 or 1) PIL's ``draft`` picks for ``need`` (W, H)."""
    fits = min(width // max(1, need[0]), height // max(1, need[1]))
    return next(s for s in (8, 4, 2, 1) if fits >= s or s == 1)


def _jpeg_bytes(path: str | Path) -> bytes | str | Path:
    """A JPEG file's bytes (for `_turbo_jpeg`), or ``path`` itself for any other file, which PIL opens."""
    try:
        with open(path, "rb") as f:
            head = f.read(3)
            return head + f.read() if head == _SOI else path
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataError(f"image not found: {path}") from None
    except OSError as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {str(e)[:100]})") from None


def _jpeg_exif(data: bytes) -> bytes | None | bool:
    """The first EXIF block among a JPEG's header segments (None: none), or False when PIL must read the
    header: an XMP block (it may hold the orientation) or segments that do not parse."""
    pos, n, exif = 2, len(data), None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA or (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)):
            return exif  # start of frame or scan: the application segments are behind
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            return False
        if marker == 0xE1:
            body = data[pos + 4:pos + 2 + length]
            if body.startswith(b"Exif\x00\x00"):
                exif = body if exif is None else exif  # PIL keeps the first
            elif body.startswith(b"http://ns.adobe.com/xap/1.0/"):
                return False
        pos += 2 + length
    return False


def _turbo_jpeg(data: bytes, size: tuple[int, int] | None, resize: str, max_pixels: int,
                what: str) -> Image.Image | None:
    """A baseline or progressive YCbCr or gray JPEG decoded by libjpeg-turbo (simplejpeg) to the pixels PIL's
    ``draft`` + ``load`` + ``exif_transpose`` give (same library, DCT method, upsampling and scale), or None
    when PIL must decode it: another colour space, an XMP block, an EXIF block PIL's reader refuses, or data
    libjpeg only warns about (PIL decodes those; simplejpeg's strict mode refuses them).
    """
    # Why not PIL alone: decoding 2,000 320x256 JPEGs at 1/4 scale from bytes (3 runs, one machine), simplejpeg
    # gave 1.4-1.7x PIL's images/s on one thread, and a second thread added 1.35-1.5x against PIL's 1.15-1.3x:
    # PIL parses JPEG headers in Python, holding the GIL.
    try:
        height, width, space, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if space not in ("YCbCr", "Gray"):
        return None
    if width * height > max_pixels:
        raise ImageTooLarge(f"{what}: image too large ({width}x{height} pixels, at most {max_pixels:,})")
    exif = _jpeg_exif(data)
    if exif is False:
        return None
    orientation = 1
    if exif is not None:
        try:
            orientation = Image.Exif()
            orientation.load(exif)
            orientation = orientation.get(_ORIENTATION, 1)
            hash(orientation)
        except Exception:  # noqa: BLE001 - any failure of PIL's EXIF reader: PIL's own path decides
            return None
    scale = 1
    if size is not None:
        scale = _draft_scale(width, height, _draft_need(width, height, size, resize, orientation in (5, 6, 7, 8)))
    shape = (-(-height // scale), -(-width // scale))
    try:
        arr = simplejpeg.decode_jpeg(data, "GRAY" if space == "Gray" else "RGB", min_height=shape[0],
                                     min_width=shape[1], min_factor=scale)
    except ValueError:
        return None
    if arr.shape[:2] != shape:  # not the scale PIL's draft decodes at
        return None
    im = Image.fromarray(arr[..., 0] if space == "Gray" else arr)
    turn = _TRANSPOSES.get(orientation)
    return im if turn is None else im.transpose(turn)


def _eight_bit(im: Image.Image) -> Image.Image:
    """Any mode -> 'L', 'LA', 'RGB' or 'RGBA' with 8 bits per channel.

    16-bit images are scaled by 255/65535 and float images by 255 when their values lie in [0, 1] (else as
    16-bit or 8-bit ranges, whichever holds them): PIL's own conversion clips, so a 16-bit 30000 would be 255.
    """
    if im.mode in ("L", "LA", "RGB", "RGBA"):
        return im
    if im.mode in _WIDE_MODES:
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(a.max(initial=0))
        if im.mode == "F":
            full = 1.0 if top <= 1.0 else 255.0 if top <= 255 else 65535.0
        elif im.mode.startswith("I;16"):
            full = 65535.0
        else:  # 32-bit integer: PNG and TIFF 16-bit data may open as 'I'
            full = max(65535.0, top)
        return Image.fromarray(np.clip(a / full * 255.0, 0, 255).round().astype(np.uint8), "L")
    if im.mode in ("PA",) or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA")
    if im.mode == "1":
        return im.convert("L")
    if im.mode == "La":
        return im.convert("LA")
    if im.mode == "RGBa":
        return im.convert("RGBA")
    return im.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, RGBX


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert to 'L' or 'RGB'; transparent pixels become white, as they look on a page."""
    target = "L" if channels == 1 else "RGB"
    if im.mode == target:
        return im  # PIL's convert to the same mode copies the whole bitmap (a phone photo's is 36 MB)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    return im.convert(target)


def image_to_tensor(im: Image.Image, channels: int, size: tuple[int, int], invert: str = "auto",
                    centre: bool = False, resize: str = "stretch", interpolation: str = "bilinear") -> torch.Tensor:
    """A PIL image as uint8 [channels, H, W], resized to ``size`` (H, W).

    Args:
        resize: 'stretch' resizes the whole picture to ``size``; 'shorter-crop' scales it so that it covers
            ``size`` keeping its aspect ratio (the shorter side fits) and keeps the centre.
        interpolation: 'bilinear', 'bicubic', 'lanczos' or 'nearest' (PIL's, antialiased when shrinking).
        invert: 'auto' inverts grayscale images whose border is light (a dark digit on paper), so they look
            like MNIST (light digit on black); 'yes' always inverts, 'no' never.
        centre: grayscale only: frame the ink as MNIST frames its digits (``centre_digit``) instead of
            resizing the whole picture; for a digit drawn small or off-centre.
    """
    if centre and channels == 1:
        arr = np.asarray(_to_mode(im, channels), dtype=np.uint8)
        return torch.from_numpy(centre_digit(255 - arr if _inverts(arr, invert) else arr, size))[None]
    arr = image_to_array(im, channels, size, resize, interpolation)
    if invert == "yes" or (channels == 1 and _inverts(arr[0], invert)):
        np.subtract(255, arr, out=arr)
    return torch.from_numpy(arr)


def image_to_array(im: Image.Image, channels: int, size: tuple[int, int], resize: str = "stretch",
                   interpolation: str = "bilinear", out: np.ndarray | None = None) -> np.ndarray:
    """A PIL image as uint8 [channels, H, W] at ``size`` (H, W), never inverted; into ``out`` when given.

    The numpy core of `image_to_tensor`, for decoding many files: no tensor, and with ``out`` no allocation
    but PIL's own, so a decoding thread spends little time holding the GIL.
    """
    arr = np.asarray(_resized(_to_mode(im, channels), size, resize, interpolation))  # [H, W] or [H, W, C]
    if out is None:
        out = np.empty((channels, *arr.shape[:2]), dtype=np.uint8)
    if arr.ndim == 2:
        out[0] = arr
    else:
        out[...] = arr.transpose(2, 0, 1)
    return out


def _resized(im: Image.Image, size: tuple[int, int], resize: str, interpolation: str) -> Image.Image:
    """``im`` brought to ``size`` (H, W) by ``resize`` ('stretch' | 'shorter-crop')."""
    if resize not in RESIZES:
        raise DataError(f"unknown resize {resize!r}; expected one of: {', '.join(RESIZES)}")
    if interpolation not in INTERPOLATIONS:
        raise DataError(f"unknown interpolation {interpolation!r}; expected one of: {', '.join(INTERPOLATIONS)}")
    h, w = size
    if im.size == (w, h):
        return im
    box = None
    if resize == "shorter-crop":  # the centred region of the output's aspect ratio, in source pixels
        iw, ih = im.size
        if iw * h > ih * w:
            cw = ih * w / h
            box = ((iw - cw) / 2, 0.0, (iw + cw) / 2, float(ih))
        else:
            ch = iw * h / w
            box = (0.0, (ih - ch) / 2, float(iw), (ih + ch) / 2)
    return im.resize((w, h), INTERPOLATIONS[interpolation], box=box)


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
             centre: bool = False, resize: str = "stretch", interpolation: str = "bilinear") -> torch.Tensor:
    """Paths, PIL images, numpy arrays (H,W[,C]; uint8 or float in [0,1]) or a tensor -> uint8 [N,C,H,W].

    A uint8 tensor [N,C,H,W] is taken as is; a float tensor is taken as values in [0, 1]. ``invert``,
    ``centre``, ``resize`` and ``interpolation`` are those of ``image_to_tensor`` and apply to images, not to
    tensors. Paths go through `open_image` exactly as folder training reads them.
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
            item = open_image(item, size=None if centre else size, resize=resize)
        elif isinstance(item, np.ndarray):
            a = item if item.dtype == np.uint8 else (np.clip(item, 0, 1) * 255).round().astype(np.uint8)
            if a.ndim == 3 and a.shape[2] == 1:
                a = a[:, :, 0]
            if a.ndim not in (2, 3):
                raise DataError(f"an image array must be HxW or HxWxC, got shape {item.shape}")
            item = _eight_bit(Image.fromarray(a))
        elif isinstance(item, Image.Image):
            item = _eight_bit(ImageOps.exif_transpose(item))
        else:
            raise DataError(f"cannot use {type(item).__name__} as an image")
        out.append(image_to_tensor(item, channels, size, invert, centre, resize, interpolation))
    if not out:
        raise DataError("no images given")
    return torch.stack(out)
