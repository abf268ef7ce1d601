"""The pen-drawn digits (`cnnlab.data.hand_digits`): strokes, mouse paths, the page-like pen, the framed set."""

from __future__ import annotations

import numpy as np
import pytest

from cnnlab.data.hand_digits import (
    CANVAS,
    HANDS,
    PEN,
    canvas_paths,
    digit_strokes,
    hand,
    make_hand_digits,
    render,
)
from cnnlab.errors import DataError


def test_every_hand_writes_every_digit_inside_the_box():
    for h in HANDS:
        for d in range(10):
            strokes = digit_strokes(d, h, np.random.default_rng(d))
            pts = np.concatenate(strokes)
            assert 1 <= len(strokes) <= 3
            assert pts.min() > 0.0 and pts.max() < 1.0, (h.name, d)
            # points are a mouse's: a few pixels apart on the page's canvas, never a jump across the digit
            for s in strokes:
                steps = np.linalg.norm(np.diff(s, axis=0), axis=1)
                assert steps.max() < 0.05, (h.name, d)


def test_hands_form_the_variant_digits_differently():
    def shape(d, name):
        return digit_strokes(d, hand(name))

    assert len(shape(7, "upright")) == 1 and len(shape(7, "european")) == 2  # the crossbar
    assert len(shape(1, "upright")) == 1 and len(shape(1, "european")) == 2  # flag + foot
    assert len(shape(8, "upright")) == 1 and len(shape(8, "round")) == 2  # one looping stroke vs two rings
    closed, open_ = shape(4, "upright"), shape(4, "round")
    assert closed[0][0, 0] > 0.5 > open_[0][0, 0]  # a closed 4 starts at the top of its upright, an open one left
    bar_last, bar_first = shape(5, "upright"), shape(5, "european")
    assert len(bar_last[1]) < len(bar_last[0]) and len(bar_first[0]) < len(bar_first[1])  # stroke order
    def lean(stroke):  # x of the stroke's top minus x of its bottom
        return stroke[stroke[:, 1].argmin(), 0] - stroke[stroke[:, 1].argmax(), 0]

    assert lean(shape(1, "slanted")[0]) > 0.15 and abs(lean(shape(1, "upright")[0])) < 0.05


def test_jitter_is_seeded_and_small():
    h = hand("upright")
    clean = np.concatenate(digit_strokes(3, h))
    a = np.concatenate(digit_strokes(3, h, np.random.default_rng(5)))
    b = np.concatenate(digit_strokes(3, h, np.random.default_rng(5)))
    c = np.concatenate(digit_strokes(3, h, np.random.default_rng(6)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    moved = np.abs(a - clean).max()
    assert 0.002 < moved < 0.12  # moved, but still the same 3


def test_bad_digit_and_unknown_hand_are_data_errors():
    with pytest.raises(DataError, match="0-9"):
        digit_strokes(10, HANDS[0])
    with pytest.raises(DataError, match="unknown hand 'left'.*upright"):
        hand("left")
    with pytest.raises(DataError, match="n >= 1"):
        make_hand_digits(0)


def test_canvas_paths_scale_and_stay_on_the_canvas():
    one = digit_strokes(1, hand("upright"))  # a stem 0.8 of the box high
    (path,) = canvas_paths(one, fill=0.5)
    ys = [y for _, y in path]
    assert max(ys) - min(ys) == pytest.approx(0.5 * CANVAS, abs=2)
    assert all(isinstance(v, int) for p in path for v in p)
    assert all(p != q for p, q in zip(path, path[1:]))  # no repeated points (a mouse reports moves)
    big = canvas_paths(digit_strokes(0, hand("round")), fill=1.2, offset=(0.3, 0.0))  # larger than the canvas
    pts = np.array([p for s in big for p in s])
    assert pts.min() >= 1 and pts.max() <= CANVAS - 2


def test_render_draws_a_round_pen_like_the_page():
    dot = render([[(100, 100)]])
    ys, xs = np.nonzero(dot > 127)
    assert ys.max() - ys.min() + 1 == pytest.approx(PEN, abs=1) and xs.max() - xs.min() + 1 == pytest.approx(PEN, abs=1)
    assert dot[100 + PEN // 2 - 1, 100 + PEN // 2 - 1] == 0  # round, not square: the corner of its box is empty
    bar = render([[(50, 60), (150, 60)]], pen=10)
    ys, xs = np.nonzero(bar > 127)
    assert (ys.min(), ys.max()) == pytest.approx((55, 65), abs=1)
    assert (xs.min(), xs.max()) == pytest.approx((45, 155), abs=1)  # round caps past both ends


def test_hand_digit_set_is_deterministic_balanced_and_framed_as_mnist():
    x, y = make_hand_digits(40, seed=3)
    x2, _ = make_hand_digits(40, seed=3)
    x3, _ = make_hand_digits(40, seed=4)
    assert x.shape == (40, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(x, x3)
    assert np.bincount(y, minlength=10).tolist() == [4] * 10
    for im in x:
        ys, xs = np.nonzero(im > 25)
        assert max(np.ptp(ys), np.ptp(xs)) + 1 <= 21  # the ink's box scaled into 20x20
        mass = im.astype(float)
        cy = (mass.sum(1) * np.arange(28)).sum() / mass.sum()
        cx = (mass.sum(0) * np.arange(28)).sum() / mass.sum()
        assert abs(cy - 13.5) < 1 and abs(cx - 13.5) < 1  # centre of mass mid-image
        assert 0.03 < (im > 127).mean() < 0.5  # a thin 1 to a heavy 8
