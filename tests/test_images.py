"""Image preprocessing: MNIST-style framing of a digit (`centre`); the one opener's pixel values (16-bit, float,
palette, EXIF), shared by training and prediction; resize modes, JPEG draft, refusals."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnlab.data import images as images_mod
from cnnlab.data import load_dataset
from cnnlab.data.folder import parse_folder_name, scan_folder
from cnnlab.data.images import (
    MAX_PIXELS,
    ImageTooLarge,
    as_batch,
    centre_digit,
    image_to_array,
    image_to_tensor,
    open_image,
)
from cnnlab.errors import DataError
from cnnlab.serve import decode as serve_decode


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


# ----------------------------------------------------------------------------- one opener: pixel values



def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` grayscale pixels but holds almost no data (a decompression bomb's
    header: refused before anything is decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def exif_rotated_jpeg(path: Path) -> None:
    """A 40 wide x 20 tall JPEG, left half dark, right half light, tagged 'rotate 90 degrees clockwise to view'
    (orientation 6): viewed, it is 20 wide x 40 tall with the dark half on top."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 20:] = 230
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, exif=exif, quality=95)


def palette_png(path: Path, transparent: bool = False) -> None:
    im = Image.new("P", (6, 6), 1)
    im.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    im.save(path, transparency=1) if transparent else im.save(path)


@pytest.fixture
def odd_files(tmp_path):
    """Files whose pixels PIL's plain conversions get wrong, each with the 8-bit value the model must see."""
    d = tmp_path / "odd"
    d.mkdir()
    Image.fromarray(np.full((6, 6), 30000, np.uint16)).save(d / "gray16.png")  # 30000 / 65535 * 255 = 116.7
    Image.fromarray(np.full((6, 6), 0.8, np.float32)).save(d / "float.tiff")  # 0.8 * 255 = 204
    palette_png(d / "palette.png")
    palette_png(d / "palette_clear.png", transparent=True)
    exif_rotated_jpeg(d / "rotated.jpg")
    return d


def test_16_bit_and_float_are_scaled_not_clipped(odd_files):
    assert np.asarray(open_image(odd_files / "gray16.png")).tolist() == [[117] * 6] * 6
    assert np.asarray(open_image(odd_files / "float.tiff")).tolist() == [[204] * 6] * 6
    # The same bytes through the server's path (bytes, not a path) give the same pixels.
    assert np.asarray(open_image((odd_files / "gray16.png").read_bytes())).max() == 117


def test_palette_images_keep_their_colours_and_transparency_is_white(odd_files):
    assert open_image(odd_files / "palette.png").getpixel((2, 2)) == (200, 10, 30)
    t = image_to_tensor(open_image(odd_files / "palette_clear.png"), 3, (6, 6), invert="no")
    assert t[:, 2, 2].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(odd_files):
    im = open_image(odd_files / "rotated.jpg")
    assert im.size == (20, 40)  # W x H as viewed
    a = np.asarray(im.convert("L"), dtype=int)
    assert a[:18].mean() < 20 and a[22:].mean() > 210  # the dark half is on top
    # Drafted decoding (a target size given, H 8 x W 4) honours the orientation too: a 1/4 scale covers it.
    assert open_image(odd_files / "rotated.jpg", size=(8, 4)).size == (5, 10)


def test_training_and_prediction_see_the_same_arrays(odd_files, tmp_path, data_env):
    """Folder training and `as_batch` (predict, serve) read a file through one opener: identical uint8 rows."""
    root = tmp_path / "ds"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    for i, f in enumerate(sorted(odd_files.iterdir())):
        (root / "ab"[i % 2] / f.name).write_bytes(f.read_bytes())
    for resize in ("shorter-crop", "stretch"):
        ds = load_dataset(f"folder:{root}?val=0.5&size=12x10&channels=3&resize={resize}", "train")
        val = load_dataset(f"folder:{root}?val=0.5&size=12x10&channels=3&resize={resize}", "val")
        scan = scan_folder(parse_folder_name(f"{root}?val=0.5&size=12x10&channels=3&resize={resize}"))
        for split, data in (("train", ds), ("val", val)):
            paths = [p for p, _ in scan.splits[split]]
            predicted = as_batch(paths, 3, (12, 10), invert="no", resize=resize)
            assert predicted.equal(data.images), (split, resize)
            if resize == "stretch":  # the server's path: header priced first, then decoded by the same opener
                shape = (3, 12, 10)
                for p, row in zip(paths, data.images):
                    if p.suffix != ".tiff":  # not among the formats the server accepts
                        served = serve_decode.decode(serve_decode.plan_file(p.read_bytes(), shape), shape, "no")
                        assert served[0].equal(row), (split, p.name)
        rows = {p.name: row for s, d in (("train", ds), ("val", val)) for (p, _), row in zip(scan.splits[s], d.images)}
        assert rows["gray16.png"][:, 6, 5].tolist() == [117] * 3 and rows["float.tiff"][:, 6, 5].tolist() == [204] * 3


def test_shorter_side_resize_keeps_the_centre():
    a = np.zeros((20, 60), np.uint8)
    a[:, 20:40] = 255  # a light middle third
    t = image_to_tensor(Image.fromarray(a), 1, (10, 10), invert="no", resize="shorter-crop")
    assert t.shape == (1, 10, 10) and (t[0, :, 1:-1] == 255).all()  # only the middle third is kept
    assert t.float().mean() > 240  # (the outer columns see a little of the filter's reach beyond the crop)
    s = image_to_tensor(Image.fromarray(a), 1, (10, 10), invert="no", resize="stretch")
    assert 60 < s.float().mean() < 110  # the whole picture squeezed: a third of it light


def test_jpeg_draft_decodes_near_the_target_size(tmp_path):
    path = tmp_path / "photo.jpg"
    y, x = np.mgrid[0:1200, 0:1600]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(path, quality=90)
    small = open_image(path, size=(64, 64), resize="shorter-crop")
    assert small.size == (200, 150)  # 1/8 scale still covers 64 px on the shorter side
    full = open_image(path)
    assert full.size == (1600, 1200)
    a = image_to_tensor(small, 3, (64, 64), invert="no", resize="shorter-crop").float()
    b = image_to_tensor(full, 3, (64, 64), invert="no", resize="shorter-crop").float()
    assert (a - b).abs().mean() < 12  # the same picture at the same size


@pytest.mark.robust
def test_huge_and_broken_images_are_one_line_errors(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png_header_only(8000, 6000))  # 48 MP
    with pytest.raises(ImageTooLarge) as e:
        open_image(big)
    assert "too large" in str(e.value) and "\n" not in str(e.value)
    bomb = png_header_only(20000, 20000)  # 400 MP: PIL itself refuses it while opening
    with pytest.raises(ImageTooLarge):
        open_image(bomb)
    with pytest.raises(DataError, match="not an image in a supported format"):
        open_image(b"hello", formats=("PNG",))
    with pytest.raises(DataError, match="image not found"):
        open_image(tmp_path / "missing.png")


def _valid_files() -> list[bytes]:
    out = []
    for fmt, mode in (("PNG", "L"), ("PNG", "P"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"), ("WEBP", "RGB"),
                      ("TIFF", "F")):
        buf = io.BytesIO()
        a = (np.arange(64 * 48) % 251).reshape(48, 64)
        if mode == "F":
            im = Image.fromarray(a.astype(np.float32) / 251, "F")
        else:
            im = Image.fromarray(a.astype(np.uint8)).convert(mode)
        im.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


VALID = _valid_files()


@pytest.mark.robust
@settings(max_examples=150, deadline=None)
@given(which=st.integers(0, len(VALID) - 1),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       cut=st.integers(0, 10**6))
def test_mutated_image_files_give_an_image_or_a_clean_error(which, edits, cut):
    """Random byte edits and truncations of valid files: `open_image` returns an 8-bit image or raises DataError."""
    data = bytearray(VALID[which])
    for pos, value in edits:
        data[pos % len(data)] = value
    data = bytes(data[:max(1, cut % (len(data) + 1))])
    try:
        im = open_image(data, size=(16, 16))
    except DataError as e:
        assert "\n" not in str(e)
        return
    assert im.mode in ("L", "LA", "RGB", "RGBA")
    assert image_to_tensor(im, 3, (16, 16), invert="no", resize="shorter-crop").shape == (3, 16, 16)


@pytest.mark.robust
@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_give_a_clean_error(data):
    try:
        open_image(data)
    except DataError:
        pass


def test_image_to_array_is_image_to_tensor_written_into_a_row(odd_files, tmp_path):
    for name, channels in (("rotated.jpg", 3), ("palette_clear.png", 3), ("gray16.png", 1), ("rotated.jpg", 1)):
        im = open_image(odd_files / name)
        row = np.full((channels, 7, 5), 9, dtype=np.uint8)
        out = image_to_array(im, channels, (7, 5), "shorter-crop", out=row)
        assert out is row
        assert np.array_equal(row, image_to_tensor(im, channels, (7, 5), invert="no", resize="shorter-crop").numpy())
    rgb = Image.new("RGB", (4, 3), (1, 2, 3))
    assert np.array_equal(image_to_array(rgb, 3, (3, 4)), np.array([1, 2, 3], dtype=np.uint8)[:, None, None]
                          .repeat(3, 1).repeat(4, 2))
    with pytest.raises(DataError, match="image not found"):
        open_image(tmp_path)  # a folder is not an image file either


def test_orientation_from_xmp_alone_is_applied_and_drafted(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (20, 0, 40, 20))  # right half white
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
           b'</x:xmpmeta>')
    path = tmp_path / "xmp.jpg"
    im.save(path, xmp=xmp)
    with Image.open(path) as raw:
        assert "exif" not in raw.info  # only XMP says it is turned
    for size in (None, (8, 4)):
        turned = open_image(path, size=size)
        assert turned.size == ((20, 40) if size is None else (5, 10))  # 90 degrees: W x H swapped
        a = np.asarray(turned.convert("L"), dtype=int)
        h = a.shape[0]
        assert a[h // 2 + 2:].mean() > 200 and a[:h // 2 - 2].mean() < 50  # the white half is at the bottom


# ----------------------------------------------------------------------------- JPEGs through libjpeg-turbo


def _photo(width: int, height: int, *, gray: bool = False, subsampling: int = 2, progressive: bool = False,
           orientation: int | None = None, xmp: bytes | None = None, mode: str | None = None) -> bytes:
    """A JPEG of a smooth random picture (real DCT content at every scale), with the options a camera or an
    editor writes."""
    rng = np.random.default_rng(width * 7 + height)
    im = Image.fromarray(rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8))
    im = im.resize((width, height), Image.Resampling.BICUBIC).convert(mode or ("L" if gray else "RGB"))
    extra = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif.tobytes()
    if xmp is not None:
        extra["xmp"] = xmp
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=88, subsampling=subsampling, progressive=progressive, **extra)
    return buf.getvalue()


def _pil_only(monkeypatch, data: bytes, **kw) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(images_mod, "simplejpeg", None)
        return np.asarray(open_image(data, **kw))


JPEG_KINDS = [dict(), dict(gray=True), dict(subsampling=0), dict(subsampling=1), dict(progressive=True),
              *(dict(orientation=k) for k in range(1, 9))]


@pytest.mark.skipif(images_mod.simplejpeg is None, reason="needs simplejpeg")
@pytest.mark.parametrize("kind", JPEG_KINDS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()) or "plain")
@pytest.mark.parametrize("width,height", [(320, 256), (333, 251), (97, 131)])
def test_libjpeg_turbo_decodes_exactly_the_pixels_pil_does(monkeypatch, kind, width, height):
    """The fast path must not change a single pixel: a cache written by one path is read beside the other
    (predict on a machine without simplejpeg), and PIL decodes what the fast path declines."""
    data = _photo(width, height, **kind)
    for size in (None, (16, 16), (28, 28), (64, 64), (100, 50), (224, 224), (7, 300)):
        for resize in ("stretch", "shorter-crop"):
            kw = dict(size=size, resize=resize)
            assert images_mod._turbo_jpeg(data, size, resize, MAX_PIXELS, "x") is not None  # the fast path ran
            fast, pil = np.asarray(open_image(data, **kw)), _pil_only(monkeypatch, data, **kw)
            assert fast.shape == pil.shape and np.array_equal(fast, pil), (size, resize)


@pytest.mark.skipif(images_mod.simplejpeg is None, reason="needs simplejpeg")
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_jpegs_the_fast_path_declines_are_decoded_by_pil(monkeypatch, tmp_path):
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
           b'</x:xmpmeta>')
    good = _photo(80, 60)
    broken_exif = good[:2] + b"\xff\xe1\x00\x10Exif\x00\x00MM\x00\x2a\x00\x00\x00\x99" + good[2:]
    declined = {"cmyk": _photo(80, 60, mode="CMYK"), "xmp": _photo(80, 60, xmp=xmp),
                "truncated": good[:len(good) // 2], "broken exif": broken_exif}
    for name, data in declined.items():
        if name != "broken exif":  # (PIL's EXIF reader warns and reads no orientation: both paths agree)
            assert images_mod._turbo_jpeg(data, (16, 16), "stretch", MAX_PIXELS, "x") is None, name
        try:
            pil = _pil_only(monkeypatch, data, size=(16, 16))
        except DataError as e:  # PIL refuses it too: the same one-line error either way
            with pytest.raises(DataError) as again:
                open_image(data, size=(16, 16))
            assert str(again.value) == str(e)
            continue
        assert np.array_equal(np.asarray(open_image(data, size=(16, 16))), pil), name
    path = tmp_path / "big.jpg"
    path.write_bytes(good)
    with pytest.raises(ImageTooLarge, match="80x60 pixels"):
        open_image(path, max_pixels=1000)
