"""Image preprocessing for prediction: MNIST-style framing of a digit (`centre`)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cnnlab.data.images import as_batch, centre_digit, image_to_tensor


def centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    m = a.astype(np.float64)
    return (m.sum(1) * np.arange(a.shape[0])).sum() / m.sum(), (m.sum(0) * np.arange(a.shape[1])).sum() / m.sum()


def ink_box(a: np.ndarray, level: int = 30) -> tuple[int, int]:
    ys, xs = np.nonzero(a > level)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def test_small_off_centre_digit_is_scaled_to_20_px_and_centred_by_mass():
    big = np.zeros((280, 280), np.uint8)
    big[10:60, 200:230] = 255  # a 50x30 blob near the top-right corner, as drawn small on the page
    big[10:20, 200:260] = 255  # with an arm, so the centre of mass is not the centre of the box
    out = centre_digit(big)
    assert out.shape == (28, 28) and out.dtype == np.uint8
    h, w = ink_box(out)
    assert w == 20 and abs(h - round(50 * 20 / 60)) <= 1  # the 60 x 50 box: its longer side fits 20 px
    cy, cx = centre_of_mass(out)
    assert abs(cy - 13.5) <= 0.6 and abs(cx - 13.5) <= 0.6  # MNIST puts the centre of mass mid-image

    plain = np.asarray(Image.fromarray(big).resize((28, 28), Image.Resampling.BILINEAR))
    assert ink_box(plain, 10)[0] <= 8  # what the model would see without framing: a speck in the corner


def test_aspect_ratio_is_kept():
    bar = np.zeros((300, 300), np.uint8)
    bar[50:250, 140:160] = 200  # a '1': 200 tall, 20 wide
    h, w = ink_box(centre_digit(bar), level=20)
    assert h == 20 and w <= 3


def test_centring_a_centred_mnist_like_digit_changes_little():
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 11:17] = 255  # already 20 tall and centred
    out = centre_digit(digit)
    assert np.abs(out.astype(int) - digit.astype(int)).mean() < 10


def test_blank_and_tiny_images():
    assert not centre_digit(np.zeros((100, 100), np.uint8)).any()
    one = np.zeros((5, 5), np.uint8)
    one[0, 4] = 255
    out = centre_digit(one)
    assert out.max() > 0 and out.shape == (28, 28)
    cy, cx = centre_of_mass(out)
    assert abs(cy - 13.5) <= 1 and abs(cx - 13.5) <= 1


def test_image_to_tensor_inverts_paper_then_frames_and_leaves_colour_alone():
    paper = np.full((120, 90), 255, np.uint8)
    paper[20:50, 60:70] = 0  # a dark '1' on white paper, off-centre
    t = image_to_tensor(Image.fromarray(paper), 1, (28, 28), "auto", centre=True)
    assert t.shape == (1, 28, 28)
    assert t[0, 0, 0] == 0 and ink_box(t[0].numpy())[0] == 20  # inverted to light-on-dark, then framed
    rgb = Image.fromarray(np.stack([paper] * 3, -1))
    a = image_to_tensor(rgb, 3, (32, 32), "auto", centre=True)
    b = image_to_tensor(rgb, 3, (32, 32), "auto", centre=False)
    assert a.equal(b)  # colour images are not digits: centre does nothing
    batch = as_batch([Image.fromarray(paper)] * 2, 1, (28, 28), centre=True)
    assert batch.shape == (2, 1, 28, 28) and batch[0].equal(t)


@pytest.mark.parametrize("size", [(28, 28), (32, 32)])
def test_other_output_sizes_scale_the_box(size):
    img = np.zeros((64, 64), np.uint8)
    img[0:64, 30:34] = 255
    h, _ = ink_box(centre_digit(img, size))
    assert h == round(20 / 28 * size[0])
