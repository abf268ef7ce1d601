"""Digits drawn with a pen, stroke by stroke: the ten digits as a person writes them, for the web page's
drawing canvas (mouse paths) and as a second out-of-distribution set (rendered images).

Each digit is one or more strokes, polylines sampled from lines, elliptic arcs and Bezier curves in a unit box
(x to the right, y downwards, the digit standing about 0.8 high). A `Hand` picks how its writer forms the
digits that people write differently (a 1 with or without a flag and a foot, a 4 open or closed, a 7 with or
without a bar, an 8 in one looping stroke or as two stacked rings, a 5's bar drawn first or last) and how it
slants and how wide it writes. `digit_strokes` applies the hand and a small seeded jitter (a slow wobble
along each stroke, a little rotation and size), `canvas_paths` scales the strokes to a drawing canvas as
mouse paths, `render` draws them as the page does (white round-capped, round-joined lines of a pen width on
black), and `make_hand_digits` frames rendered digits as MNIST (`images.centre_digit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError
from .images import centre_digit

Stroke = np.ndarray  # float [N, 2]: (x, y) points in the unit box, y downwards
CANVAS = 280  # px: the web page's canvas side
PEN = 22  # px: the web page's pen width on that canvas
STEP = 0.025  # unit-box distance between sampled points (a mouse reports a point every few pixels)


@dataclass(frozen=True)
class Hand:
    """One writer's way of forming the digits.

    Attributes:
        name: Short name (table rows, test ids).
        slant: Horizontal shear, x += slant * (0.5 - y): positive leans the tops to the right.
        aspect: Horizontal scale about the centre: below 1 writes narrower digits.
        one: 'bar' (a plain stroke), 'flag' (an up-stroke into it), 'serif' (a flag and a foot).
        four: 'closed' (the diagonal meets the upright) or 'open' (an upright, a bar, a separate upright).
        seven: 'plain' or 'bar' (a crossbar through the stem, as written in much of Europe).
        eight: 'loop' (one crossing stroke) or 'rings' (two stacked ovals).
        five: 'bar-last' (the down-stroke and belly first, the top bar after) or 'bar-first'.
        two: 'plain' or 'loop' (a small loop where the diagonal meets the base).
        nine: 'straight' (a straight tail) or 'curved' (a tail that hooks left).
    """

    name: str
    slant: float = 0.0
    aspect: float = 1.0
    one: str = "bar"
    four: str = "closed"
    seven: str = "plain"
    eight: str = "loop"
    five: str = "bar-last"
    two: str = "plain"
    nine: str = "straight"


HANDS = (
    Hand("upright"),
    Hand("slanted", slant=0.25, aspect=0.9, one="flag", four="open", nine="curved"),
    Hand("european", slant=0.1, one="serif", four="open", seven="bar", five="bar-first"),
    Hand("round", slant=-0.05, aspect=1.15, eight="rings", two="loop", four="open"),
    Hand("narrow", slant=0.15, aspect=0.75, one="flag", seven="bar", eight="rings", nine="curved"),
)


def hand(name: str) -> Hand:
    """The `HANDS` entry called ``name``; DataError names the known ones otherwise."""
    for h in HANDS:
        if h.name == name:
            return h
    raise DataError(f"unknown hand {name!r}; known: {', '.join(h.name for h in HANDS)}")


# -- curve primitives (all return float [N, 2] sampled about every STEP) -------------------------------------

def _resample(points: np.ndarray) -> np.ndarray:
    """Points along the polyline ``points`` spaced about STEP apart (its ends kept)."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    dist = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(math.ceil(dist[-1] / STEP)) + 1)
    at = np.linspace(0.0, dist[-1], n)
    return np.stack([np.interp(at, dist, points[:, 0]), np.interp(at, dist, points[:, 1])], axis=1)


def line(*points: tuple[float, float]) -> Stroke:
    """A polyline through ``points``."""
    return _resample(np.asarray(points, dtype=np.float64))


def arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float) -> Stroke:
    """An elliptic arc from angle ``start`` to ``end`` (degrees; 0 = right, 90 = down, as y points down)."""
    t = np.radians(np.linspace(start, end, 200))
    return _resample(np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1))


def bezier(*control: tuple[float, float]) -> Stroke:
    """A Bezier curve of any degree through its first and last ``control`` points (de Casteljau)."""
    pts = np.asarray(control, dtype=np.float64)
    t = np.linspace(0.0, 1.0, 200)[:, None, None]
    layer = np.broadcast_to(pts, (200, *pts.shape)).copy()
    while layer.shape[1] > 1:
        layer = (1 - t) * layer[:, :-1] + t * layer[:, 1:]
    return _resample(layer[:, 0])


def chain(*parts: Stroke) -> Stroke:
    """One stroke made of pieces drawn without lifting the pen (a gap between two pieces is drawn straight)."""
    return _resample(np.concatenate(parts))


# -- the digits -----------------------------------------------------------------------------------------------

def _zero(h: Hand) -> list[Stroke]:
    # Started at the top and drawn anticlockwise, overshooting a little where it closes.
    return [arc(0.5, 0.5, 0.27, 0.4, -95, -95 - 370)]


def _one(h: Hand) -> list[Stroke]:
    stem = line((0.52, 0.1), (0.5, 0.9))
    if h.one == "bar":
        return [stem]
    flagged = chain(line((0.34, 0.27), (0.52, 0.1)), stem)
    return [flagged] if h.one == "flag" else [flagged, line((0.34, 0.9), (0.68, 0.9))]


def _two(h: Hand) -> list[Stroke]:
    top = bezier((0.24, 0.3), (0.26, 0.05), (0.78, 0.02), (0.74, 0.33))
    if h.two == "loop":
        down = line((0.74, 0.33), (0.3, 0.8))
        loop = arc(0.3, 0.86, 0.09, 0.06, -90, 180)  # round the small loop, out along the base
        return [chain(top, down, loop, line((0.39, 0.86), (0.8, 0.88)))]
    return [chain(top, line((0.74, 0.33), (0.22, 0.88), (0.8, 0.88)))]


def _three(h: Hand) -> list[Stroke]:
    upper = bezier((0.24, 0.2), (0.4, 0.02), (0.82, 0.08), (0.72, 0.3), (0.62, 0.47), (0.44, 0.47))
    lower = bezier((0.44, 0.47), (0.88, 0.45), (0.84, 0.9), (0.52, 0.9), (0.34, 0.9), (0.22, 0.8))
    return [chain(upper, lower)]


def _four(h: Hand) -> list[Stroke]:
    if h.four == "open":
        return [line((0.3, 0.1), (0.24, 0.58), (0.8, 0.58)), line((0.66, 0.2), (0.64, 0.9))]
    return [line((0.6, 0.1), (0.2, 0.64), (0.82, 0.64)), line((0.62, 0.1), (0.62, 0.9))]


def _five(h: Hand) -> list[Stroke]:
    bar = line((0.33, 0.12), (0.76, 0.1))
    body = chain(line((0.33, 0.12), (0.29, 0.46)),
                 bezier((0.29, 0.46), (0.6, 0.3), (0.9, 0.55), (0.74, 0.8), (0.58, 0.96), (0.3, 0.9), (0.22, 0.8)))
    return [bar, body] if h.five == "bar-first" else [body, bar]


def _six(h: Hand) -> list[Stroke]:
    # From the top right down the left side, round the bowl and up into the left side again.
    down = bezier((0.68, 0.12), (0.38, 0.14), (0.26, 0.45), (0.28, 0.68))
    bowl = arc(0.5, 0.68, 0.22, 0.2, 180, 180 + 340)
    return [chain(down, bowl)]


def _seven(h: Hand) -> list[Stroke]:
    body = line((0.22, 0.14), (0.78, 0.12), (0.44, 0.9))
    return [body, line((0.4, 0.52), (0.74, 0.5))] if h.seven == "bar" else [body]


def _eight(h: Hand) -> list[Stroke]:
    if h.eight == "rings":
        return [arc(0.5, 0.3, 0.19, 0.19, -90, -90 - 360), arc(0.5, 0.69, 0.24, 0.21, -90, 270)]
    # One stroke: an S from the top right down to the bottom, then up again crossing in the middle.
    t = np.linspace(0.0, 2 * math.pi, 400)
    x = 0.5 - 0.24 * np.sin(2 * t) * np.where(t < math.pi, 1.0, 0.8)  # the top loop a little narrower
    y = 0.5 - 0.4 * np.cos(t)
    lead_in = np.array([[0.66, 0.14]])  # a pen starting an 8 comes in from the right of the top
    return [chain(lead_in, _resample(np.stack([x, y], axis=1)))]


def _nine(h: Hand) -> list[Stroke]:
    head = arc(0.48, 0.32, 0.22, 0.2, -10, -10 - 350)
    if h.nine == "curved":
        tail = bezier((0.7, 0.3), (0.7, 0.7), (0.66, 0.9), (0.4, 0.88))
    else:
        tail = line((0.7, 0.3), (0.66, 0.9))
    return [chain(head, tail)]


_DIGITS = (_zero, _one, _two, _three, _four, _five, _six, _seven, _eight, _nine)


def _wobble(stroke: Stroke, rng: np.random.Generator, amp: float) -> Stroke:
    """``stroke`` displaced by a slow random wobble of about ``amp`` (a sum of two low-frequency sines per axis)."""
    s = np.linspace(0.0, 1.0, len(stroke))[:, None]
    out = stroke.copy()
    for freq in (1.0, 2.0):
        phase = rng.uniform(0, 2 * math.pi, size=2)
        out += amp / freq * rng.uniform(-1, 1, size=2) * np.sin(2 * math.pi * freq * s + phase)
    return out


def digit_strokes(digit: int, hand_: Hand, rng: np.random.Generator | None = None, jitter: float = 1.0) -> list[Stroke]:
    """The strokes of ``digit`` in ``hand_``, in the order they are drawn, in the unit box.

    Args:
        digit: 0-9.
        hand_: How the digit is formed, slanted and proportioned.
        rng: Source of the jitter; None draws the hand's clean shapes.
        jitter: Scale of the jitter (a wobble of about 0.012 of the box, rotation up to 4 degrees, size and
            aspect within 6%, all multiplied by it).

    Returns:
        A list of float [N, 2] point arrays, x to the right and y downwards, within about [0.05, 0.95].
    """
    if not 0 <= digit <= 9:
        raise DataError(f"a digit is 0-9, got {digit}")
    strokes = _DIGITS[digit](hand_)
    rot, scale, aspect = 0.0, 1.0, hand_.aspect
    if rng is not None and jitter > 0:
        strokes = [_wobble(s, rng, 0.012 * jitter) for s in strokes]
        rot = math.radians(rng.uniform(-4, 4) * jitter)
        scale = 1 + rng.uniform(-0.06, 0.06) * jitter
        aspect *= 1 + rng.uniform(-0.06, 0.06) * jitter
    out = []
    for s in strokes:
        x, y = s[:, 0] - 0.5, s[:, 1] - 0.5
        x = aspect * (x - hand_.slant * y)  # shear about the centre line, then width
        x, y = x * math.cos(rot) - y * math.sin(rot), x * math.sin(rot) + y * math.cos(rot)
        out.append(np.stack([0.5 + scale * x, 0.5 + scale * y], axis=1))
    return out


def canvas_paths(strokes: list[Stroke], size: int = CANVAS, fill: float = 0.75,
                 offset: tuple[float, float] = (0.0, 0.0)) -> list[list[tuple[int, int]]]:
    """The strokes as mouse paths on a ``size`` x ``size`` canvas, in whole pixels from its top-left corner.

    Args:
        strokes: Unit-box strokes (`digit_strokes`).
        size: Canvas side in px.
        fill: Height of the unit box's 0.8-high digit as a fraction of the canvas (people draw large on a pad).
        offset: Shift of the digit's box centre from the canvas centre, as fractions of ``size``.

    Returns:
        One list of (x, y) points per stroke, clipped inside the canvas; consecutive duplicates removed.
    """
    k = fill * size / 0.8
    cx, cy = size / 2 + offset[0] * size, size / 2 + offset[1] * size
    paths = []
    for s in strokes:
        pts = np.clip(np.rint(np.stack([cx + k * (s[:, 0] - 0.5), cy + k * (s[:, 1] - 0.5)], axis=1)), 1, size - 2)
        path = [(int(x), int(y)) for x, y in pts]
        paths.append([p for i, p in enumerate(path) if i == 0 or p != path[i - 1]])
    return paths


def render(paths: list[list[tuple[int, int]]], size: int = CANVAS, pen: int = PEN) -> np.ndarray:
    """Mouse paths drawn as the web page draws them: white, ``pen`` px wide, round caps and joins, on black.

    Returns:
        uint8 [size, size].
    """
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    r = pen / 2
    for path in paths:
        if len(path) > 1:
            draw.line(path, fill=255, width=pen, joint="curve")
        for x, y in path:  # round caps and joins at every point, as the page's lineCap / lineJoin 'round'
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(im, dtype=np.uint8)


def make_hand_digits(n: int = 1000, seed: int = 0, fill: tuple[float, float] = (0.3, 0.9),
                     pen: tuple[int, int] = (12, 30), jitter: tuple[float, float] = (0.5, 2.0),
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pen-drawn digits rendered on a canvas of the page's size and framed as MNIST, deterministic from ``seed``.

    Sample ``i`` shows digit ``i % 10`` in hand ``HANDS[(i // 10) % len(HANDS)]``; each gets its own jitter scale
    (``jitter``), size (``fill``, the digit's height as a fraction of the canvas), position and pen width
    (``pen``, px on the 280 px canvas; the page's pen is 22). A digit drawn small with a wide pen comes out
    bold once framed, one drawn large with a narrow pen thin, as on a phone or a tablet.

    Returns:
        (images uint8 [n, 28, 28], labels int64 [n]).
    """
    if n < 1:
        raise DataError(f"the hand-drawn digit set needs n >= 1, got {n}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 10
    images = []
    for i, d in enumerate(labels):
        strokes = digit_strokes(int(d), HANDS[(i // 10) % len(HANDS)], rng, jitter=float(rng.uniform(*jitter)))
        f = float(rng.uniform(*fill))
        room = max(0.0, (1 - f) / 2 - 0.05)  # keeps the digit on the canvas
        paths = canvas_paths(strokes, fill=f, offset=tuple(rng.uniform(-room, room, size=2)))
        images.append(centre_digit(render(paths, pen=int(rng.integers(pen[0], pen[1] + 1)))))
    return np.stack(images), labels
