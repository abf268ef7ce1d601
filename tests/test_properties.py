"""Property tests of the parsers that read untrusted input: the IDX and CIFAR readers, the model spec parser
and the image decoders. Random bytes, and random mutations of valid files, must give a valid result or a
`CnnlabError` (one clear line for the user), never another exception.
"""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import cifar_batch_dict, cifar_meta_dict, idx_bytes, py2_pickle
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnlab.data import formats
from cnnlab.data.images import open_image
from cnnlab.errors import CnnlabError, DataError, ModelError
from cnnlab.models.spec import build_from_spec, spec_from_toml

FAST = settings(max_examples=60, deadline=None)


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """``valid`` with a few bytes overwritten, a run inserted or deleted, and possibly cut short."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["set", "insert", "delete"]))
        if kind == "set":
            data[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[i:i + draw(st.integers(1, 8))]
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut] if draw(st.booleans()) else data)


def in_file(data: bytes, name: str, read):
    """``read(path)`` on a temporary file holding ``data`` (hypothesis reruns a test many times, so it does not
    use pytest's per-test tmp_path)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        return read(path)


def clean(read, *args):
    """The result of ``read(*args)``, or None when it raised a CnnlabError (any other exception fails the test)."""
    try:
        return read(*args)
    except CnnlabError:
        return None


# ----------------------------------------------------------------------------- IDX

_IMAGES = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
_VALID_IDX = idx_bytes(_IMAGES)
_VALID_LABELS = idx_bytes(np.array([0, 1, 2], np.uint8))


@FAST
@given(data=st.binary(max_size=200) | mutated(_VALID_IDX), compress=st.booleans())
def test_idx_reader_gives_an_array_or_a_data_error(data, compress):
    raw = gzip.compress(data, mtime=0) if compress else data
    out = clean(in_file, raw, "x-idx3-ubyte.gz" if compress else "x-idx3-ubyte", formats.read_idx)
    if out is not None:
        assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and 1 <= out.ndim
        if data == _VALID_IDX:
            assert np.array_equal(out, _IMAGES)


@FAST
@given(data=mutated(gzip.compress(_VALID_IDX, mtime=0)))
def test_idx_reader_on_a_mutated_gzip_stream(data):
    clean(in_file, data, "x-idx3-ubyte.gz", formats.read_idx)


@FAST
@given(images=mutated(_VALID_IDX), labels=mutated(_VALID_LABELS))
def test_idx_pair_reader_checks_what_it_returns(images, labels):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "i").write_bytes(images)
        (Path(d) / "l").write_bytes(labels)
        out = clean(formats.read_idx_pair, Path(d) / "i", Path(d) / "l", 10)
    if out is not None:
        x, y = out
        assert x.ndim == 3 and y.ndim == 1 and len(x) == len(y) and (y < 10).all()


# ----------------------------------------------------------------------------- CIFAR

_RNG = np.random.default_rng(0)
_VALID_BATCH = py2_pickle(cifar_batch_dict(_RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
                                           np.array([3, 7]), "training batch 1 of 5"))
_VALID_META = py2_pickle(cifar_meta_dict())


@FAST
@given(data=st.binary(max_size=300) | mutated(_VALID_BATCH))
def test_cifar_batch_reader_gives_arrays_or_a_data_error(data):
    out = clean(in_file, data, "data_batch_1", formats.read_cifar_batch)
    if out is not None:
        x, y = out
        assert x.dtype == np.uint8 and len(x) == len(y)


@FAST
@given(data=st.binary(max_size=300) | mutated(_VALID_META))
def test_cifar_meta_reader_gives_names_or_a_data_error(data):
    out = clean(in_file, data, "batches.meta", formats.read_cifar_meta)
    if out is not None:
        assert all(isinstance(n, str) for n in out)


def test_a_memo_index_in_a_cifar_pickle_allocates_nothing(tmp_path):
    """A LONG_BINPUT opcode naming memo slot 0x0c717365 (one mutated byte of a real meta file, found by the test
    above): the C unpickler sized its memo array to that index (GBs, zeroed); ours reads it with a bounded peak.
    Run in a fresh process so its peak resident memory is this read's alone."""
    bomb = (b"\x80\x02}q\x00(U\x0blabel_namesq\x01]q\x02(U\x04frog" + b"r" + b"seq\x0c"
            + b"U\x04shipq\x03ee.")
    path = tmp_path / "batches.meta"
    path.write_bytes(bomb)
    code = ("import sys, resource; from cnnlab.data import formats; from cnnlab.errors import DataError\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    formats.read_cifar_meta(sys.argv[1])\nexcept DataError:\n    pass\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    assert int(out.stdout.strip()) < 200, f"reading a 60-byte pickle grew the peak RSS by {out.stdout.strip()} MB"


def test_valid_cifar_files_still_read():
    x, y = in_file(_VALID_BATCH, "data_batch_1", formats.read_cifar_batch)
    assert len(x) == 2 and list(y) == [3, 7]
    assert in_file(_VALID_META, "batches.meta", formats.read_cifar_meta)[0] == "airplane"


# ----------------------------------------------------------------------------- model specs

# Numbers stay small so that a spec the parser accepts builds a small model quickly.
_TOKEN = st.one_of(
    st.builds("conv{}k{}{}{}".format, st.integers(0, 16), st.integers(0, 6),
              st.sampled_from(["", "s1", "s2", "s0"]), st.sampled_from(["", "psame", "pvalid", "px"])),
    st.builds("fc{}".format, st.integers(0, 32)),
    st.builds("{}pool{}".format, st.sampled_from(["", "avg"]), st.integers(0, 4)),
    st.sampled_from(["gap", "bn", "flatten", "relu", "tanh", "drop0.5", "drop1", "drop-1", "bn6", ""]),
    st.builds("in{}x{}x{}".format, st.integers(0, 3), st.integers(0, 32), st.integers(0, 32)),
    st.from_regex(r"[a-z]{0,5}[0-9]?[a-z.]{0,3}", fullmatch=True),
)


@FAST
@given(tokens=st.lists(_TOKEN, max_size=8), sep=st.sampled_from(["-", "--", " - ", "_"]))
def test_spec_parser_builds_a_model_or_names_the_problem(tokens, sep):
    model = clean(build_from_spec, sep.join(tokens))
    if model is not None:
        x = torch.zeros((1, *model.meta.input_size))
        assert model.meta.num_classes >= 1 and model(x).shape == (1, model.meta.num_classes)


@FAST
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_spec_parser_on_arbitrary_text(text):
    clean(build_from_spec, text)


_VALID_TOML = b'input = [1, 28, 28]\nlayers = ["conv8k5", {type = "pool", size = 2}, "relu", "fc10"]\n'


@FAST
@given(data=st.binary(max_size=200) | mutated(_VALID_TOML))
def test_spec_toml_gives_a_spec_or_a_model_error(data):
    spec = clean(in_file, data, "net.toml", spec_from_toml)
    if spec is not None:
        assert isinstance(spec, str)
        clean(build_from_spec, spec)


def test_a_classifier_without_outputs_is_refused():
    with pytest.raises(ModelError, match="needs >= 1 output"):
        build_from_spec("conv4k3-fc0")


def test_valid_toml_spec_still_reads():
    spec = in_file(_VALID_TOML, "net.toml", spec_from_toml)
    assert build_from_spec(spec).meta.num_classes == 10
    with pytest.raises(ModelError):
        in_file(b"layers = 3", "net.toml", spec_from_toml)


# ----------------------------------------------------------------------------- image decoders


def _encoded(fmt: str, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


_VALID_IMAGES = [_encoded("PNG", "L"), _encoded("PNG", "P"), _encoded("PNG", "RGBA"), _encoded("JPEG", "RGB"),
                 _encoded("GIF", "P"), _encoded("BMP", "RGB"), _encoded("WEBP", "RGB")]
_IMAGE_BYTES = st.binary(max_size=300) | st.sampled_from(_VALID_IMAGES).flatmap(mutated)


@settings(max_examples=100, deadline=None)
@given(data=_IMAGE_BYTES, channels=st.sampled_from([1, 3]), centre=st.booleans())
def test_upload_decoder_gives_a_batch_or_a_bad_request(data, channels, centre):
    from cnnlab.serve.decode import decode, plan_file

    shape = (channels, 8, 8)
    pending = clean(plan_file, data, shape, centre)
    if pending is not None:
        out = clean(decode, pending, shape, "auto", centre)
        if out is not None:
            assert out.shape == (1, *shape) and out.dtype == torch.uint8


@FAST
@given(data=_IMAGE_BYTES)
def test_image_file_opener_gives_an_image_or_a_data_error(data):
    try:
        im = in_file(data, "x.img", open_image)
    except DataError:
        return
    assert im.width >= 1 and im.height >= 1


def test_valid_images_decode():
    from cnnlab.serve.decode import decode, plan_file

    for data in _VALID_IMAGES:
        assert decode(plan_file(data, (3, 8, 8)), (3, 8, 8), "no").shape == (1, 3, 8, 8)
