"""An out-of-distribution digit set that ships offline: digits 0-9 rendered from TrueType fonts.

MNIST's digits were written by US Census employees and high-school students; a model can score 99% on them
and still fail on digits from anywhere else. This set draws each digit from one of the fonts that ship inside
matplotlib (DejaVu Sans/Serif, STIX, Computer Modern; so it is the same on any machine with the package
installed), at a random size, stroke width, slant (shear), width (aspect), small rotation, position, blur and
ink intensity (MNIST's strokes are saturated white; a pen, a scan or a drawing rarely is), then frames it as
MNIST did (white on black, ink scaled into a 20x20 box, centre of mass at the centre of 28x28;
`images.centre_digit`).

The set is a function of its seed alone (given the same FreeType build): sample ``i`` shows digit ``i % 10``,
so the classes are balanced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..errors import DataError
from .images import centre_digit

# Text faces whose glyphs for '0'-'9' are ordinary lining figures (cmmi10 has old-style figures, DejaVu Sans Mono
# a slashed zero nobody writes, the symbol and size-variant fonts no digits).
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf", "cmti10.ttf",
)

CANVAS = 128  # px: the side of the square each glyph is drawn on before it is framed to 28x28


@dataclass(frozen=True)
class Style:
    """How one digit is drawn (every field is drawn at random per sample by `random_style`)."""

    font: str  # file name inside matplotlib's font directory
    size: int  # font size in px on the CANVAS
    stroke: int  # px: > 0 thickens the glyph's outline (PIL's stroke_width), < 0 thins it (erosion)
    shear: float  # horizontal shear x += shear * (y - centre): positive slants the top right
    aspect: float  # horizontal scale: below 1 narrows the digit
    rotate: float  # degrees, counter-clockwise
    dx: int  # offset of the glyph from the canvas centre, px
    dy: int
    blur: float  # Gaussian blur radius in px on the canvas
    ink: float  # brightness of the strokes' core, fraction of 255 (a pen or a scan rarely saturates)


def font_dir() -> Path:
    """matplotlib's bundled TrueType directory (the fonts travel with the package, so no system fonts needed)."""
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        raise DataError("the OOD digit set needs matplotlib's bundled fonts; install matplotlib") from None
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def available_fonts() -> list[str]:
    """The `FONT_FILES` present in this matplotlib installation."""
    d = font_dir()
    found = [f for f in FONT_FILES if (d / f).is_file()]
    if not found:
        raise DataError(f"no TrueType fonts for the OOD digit set in {d}")
    return found


@lru_cache(maxsize=256)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_dir() / name), size)


def random_style(rng: np.random.Generator, fonts: list[str]) -> Style:
    """One random `Style`; the ranges span what people's hands do (thin to heavy pens, upright to slanted)."""
    size = int(rng.integers(48, 80))
    return Style(font=fonts[int(rng.integers(len(fonts)))], size=size,
                 stroke=int(rng.integers(-2, max(1, size // 12) + 1)),
                 shear=float(rng.uniform(-0.15, 0.4)),  # most hands slant right
                 aspect=float(rng.uniform(0.7, 1.2)), rotate=float(rng.uniform(-12, 12)),
                 dx=int(rng.integers(-12, 13)), dy=int(rng.integers(-12, 13)),
                 blur=float(rng.uniform(0.0, 2.0)), ink=float(rng.uniform(0.4, 1.0)))


def render(digit: int, style: Style) -> np.ndarray:
    """The digit drawn white on black in ``style`` and framed as MNIST: uint8 [28, 28]."""
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    c = CANVAS / 2
    ImageDraw.Draw(canvas).text((c + style.dx, c + style.dy), str(digit), fill=255, anchor="mm",
                                font=_font(style.font, style.size), stroke_width=max(style.stroke, 0),
                                stroke_fill=255)
    canvas = _thin(canvas, -style.stroke)
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, _inverse_affine(style, c),
                              resample=Image.Resampling.BILINEAR)
    if style.blur > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(style.blur))
    arr = np.asarray(canvas, dtype=np.float32)
    # The strokes' core at ``ink`` whatever the blur did: a blurred thin stroke would otherwise be fainter still.
    arr = np.round(arr * (style.ink * 255.0 / max(arr.max(), 1.0))).astype(np.uint8)
    return centre_digit(arr)


def _thin(canvas: Image.Image, steps: int) -> Image.Image:
    """Erode the strokes by up to ``steps`` pixels per edge (3x3 minimum), stopping before a step would take
    more than half of the remaining ink (a hairline font would vanish)."""
    for _ in range(steps):
        thinner = canvas.filter(ImageFilter.MinFilter(3))
        if np.count_nonzero(np.asarray(thinner) > 127) < 0.5 * np.count_nonzero(np.asarray(canvas) > 127):
            break
        canvas = thinner
    return canvas


def _inverse_affine(style: Style, c: float) -> tuple[float, ...]:
    """PIL's AFFINE data (output -> input pixel) of: rotate, then shear and narrow, about the canvas centre."""
    t = math.radians(style.rotate)
    # Forward map A about the centre: rotate (R), then x <- aspect * (x - shear * y); PIL needs A^-1.
    rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])  # y points down in images
    shear = np.array([[style.aspect, -style.aspect * style.shear], [0.0, 1.0]])  # -: y grows downwards
    inv = np.linalg.inv(shear @ rot)
    off = np.array([c, c]) - inv @ np.array([c, c])
    return (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])


def make_ood_digits(n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rendered digits, MNIST-style, deterministic from ``seed``.

    Returns:
        (images uint8 [n, 28, 28], labels int64 [n]) with label ``i % 10`` for sample ``i``.
    """
    if n < 1:
        raise DataError(f"the OOD digit set needs n >= 1, got {n}")
    fonts = available_fonts()
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 10
    images = np.stack([render(int(d), random_style(rng, fonts)) for d in labels])
    return images, labels
