"""Tests of cnnlab.data: format readers, dataset lookup and downloads.

All data is tiny and written into tmp_path in the real formats; downloads
go to a loopback HTTP server or a monkeypatched urlopen, never the network.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import io
import os
import pickle
import shlex
import socket
import struct
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import (
    CIFAR_LABEL_NAMES,
    cifar_batch_dict,
    cifar_meta_dict,
    idx_bytes,
    py2_pickle,
    write_cifar,
    write_idx,
    write_mnist,
)

from cnnlab.data import ArrayDataset, DatasetInfo, dataset_info, list_datasets, load_dataset, sources
from cnnlab.data import download as dl
from cnnlab.data.formats import read_cifar_batch, read_cifar_meta, read_idx, read_idx_pair
from cnnlab.errors import DataError

robust = pytest.mark.robust

# The real mirror tables, captured before the autouse fixture empties them for each test.
REAL_REMOTES = (dl.MNIST_REMOTE, dl.FASHION_MNIST_REMOTE, dl.CIFAR10_REMOTE)


@pytest.fixture(autouse=True)
def _isolated(data_env: Path) -> None:
    """Every test here runs cut off from real datasets, caches and the network."""


def one_line_error(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    """Returns the error message after checking it is a single line."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ======================================================================== IDX


def test_read_idx_plain_and_gzip_detected_by_content(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    plain = write_idx(tmp_path / "a.idx", array, compress=False)
    gz = write_idx(tmp_path / "b.gz", array)
    gz_without_suffix = write_idx(tmp_path / "c-idx3-ubyte", array)  # gzip content, plain name
    for path in (plain, gz, gz_without_suffix):
        got = read_idx(path)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
        assert np.array_equal(got, array)
        assert got.flags.writeable and got.flags.c_contiguous


def test_read_idx_dims_are_big_endian(tmp_path: Path) -> None:
    array = np.zeros((300,), dtype=np.uint8)  # 300 = 0x012c: a little-endian reader would see 0x2c010000
    assert read_idx(write_idx(tmp_path / "x", array)).shape == (300,)


def test_read_idx_pair(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    got_images, got_labels = read_idx_pair(write_idx(tmp_path / "i.gz", images), write_idx(tmp_path / "l.gz", labels))
    assert np.array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and got_labels.tolist() == [0, 9, 3, 3, 1]


@robust
def test_read_idx_truncated(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(DataError) as excinfo:
        read_idx(path)
    message = one_line_error(excinfo)
    assert str(path) in message
    assert "truncated: expected 3136 bytes of data, found 3036" in message


@robust
def test_read_idx_trailing_garbage(tmp_path: Path) -> None:
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros((3,), dtype=np.uint8)) + b"junk")
    with pytest.raises(DataError, match="trailing") as excinfo:
        read_idx(path)
    assert str(path) in one_line_error(excinfo)


@robust
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n", "bad magic"),  # some other file type
        (b"\x00\x01\x08\x01\x00\x00\x00\x00", "bad magic"),  # second byte not zero
        (b"\x00\x00\x0d\x01\x00\x00\x00\x00", "type code 0x0d"),  # float32 IDX
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x05" + b"\x00\x00\x00\x01" * 5, "5 dimensions"),
        (b"\x00\x00", "only 2 bytes"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated IDX header"),  # 3 dims announced, 1 present
    ],
)
def test_read_idx_bad_header(tmp_path: Path, header: bytes, expected: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(header)
    with pytest.raises(DataError, match=expected) as excinfo:
        read_idx(path)
    assert str(path) in one_line_error(excinfo)


@robust
def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "nope.gz")


@robust
@pytest.mark.parametrize("damage", ["flip-deflate-byte", "cut-stream", "bad-crc"])
def test_read_idx_corrupt_gzip(tmp_path: Path, damage: str) -> None:
    rng = np.random.default_rng(1)
    blob = bytearray(gzip.compress(idx_bytes(rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))))
    if damage == "flip-deflate-byte":
        blob[len(blob) // 2] ^= 0xFF
    elif damage == "cut-stream":
        blob = blob[: len(blob) // 2]
    else:  # the trailer is CRC32 then size, both little-endian
        blob[-8] ^= 0x01
    path = tmp_path / "corrupt.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="corrupt gzip") as excinfo:
        read_idx(path)
    assert str(path) in one_line_error(excinfo)


@robust
def test_read_idx_pair_count_mismatch(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "i", np.zeros((5, 28, 28), dtype=np.uint8))
    labels = write_idx(tmp_path / "l", np.zeros((4,), dtype=np.uint8))
    with pytest.raises(DataError, match="4 labels but .* holds 5 images") as excinfo:
        read_idx_pair(images, labels)
    assert str(labels) in one_line_error(excinfo)


@robust
def test_read_idx_pair_wrong_ranks(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "i", np.zeros((5, 28, 28), dtype=np.uint8))
    labels = write_idx(tmp_path / "l", np.zeros((5,), dtype=np.uint8))
    with pytest.raises(DataError, match=r"expected images of shape \[N, H, W\]"):
        read_idx_pair(labels, labels)
    with pytest.raises(DataError, match=r"expected labels of shape \[N\]"):
        read_idx_pair(images, images)


@robust
def test_read_idx_pair_label_out_of_range(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "i", np.zeros((3, 28, 28), dtype=np.uint8))
    labels = write_idx(tmp_path / "l", np.array([1, 10, 2], dtype=np.uint8))
    with pytest.raises(DataError, match=r"label 10 at index 1 is out of range 0..9") as excinfo:
        read_idx_pair(images, labels)
    assert str(labels) in one_line_error(excinfo)
    # The same file is fine for a dataset with more classes.
    assert read_idx_pair(images, labels, num_classes=11)[1].tolist() == [1, 10, 2]


# ====================================================================== CIFAR


def test_fake_cifar_is_python2_style(tmp_path: Path) -> None:
    """fakedata writes what cPickle wrote: bytes keys, numpy.core globals, no _codecs."""
    folder = write_cifar(tmp_path)
    raw = (folder / "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02"
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
    batch = pickle.loads(raw, encoding="bytes")
    assert list(batch) == [b"batch_label", b"labels", b"data", b"filenames"]


def test_read_cifar_batch_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    labels = np.array([3, 0, 9, 1])
    path = tmp_path / "data_batch_1"
    path.write_bytes(py2_pickle(cifar_batch_dict(images, labels, "training batch 1 of 5")))
    got_images, got_labels = read_cifar_batch(path)
    assert got_images.shape == (4, 32, 32, 3) and got_images.dtype == np.uint8
    assert np.array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and got_labels.tolist() == [3, 0, 9, 1]
    # The stored row is R plane, G plane, B plane, each row-major: pixel (y, x) of channel c at c*1024 + y*32 + x.
    row = pickle.loads(path.read_bytes(), encoding="bytes")[b"data"][2]
    assert got_images[2, 5, 7, 0] == row[0 * 1024 + 5 * 32 + 7]
    assert got_images[2, 31, 1, 2] == row[2 * 1024 + 31 * 32 + 1]
    # NCHW is a free (contiguous) view of the HWC result.
    assert got_images.transpose(0, 3, 1, 2).flags.c_contiguous


def test_read_cifar_meta(tmp_path: Path) -> None:
    path = tmp_path / "batches.meta"
    path.write_bytes(py2_pickle(cifar_meta_dict()))
    assert read_cifar_meta(path) == CIFAR_LABEL_NAMES


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_read_cifar_batch_python3_pickles_with_str_keys(tmp_path: Path, protocol: int) -> None:
    """Batches re-pickled by Python 3 (str keys, _codecs.encode or _frombuffer for the data) also load."""
    data = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": data, "labels": [1, 2, 3]}, protocol=protocol))
    images, labels = read_cifar_batch(path)
    assert np.array_equal(images.transpose(0, 3, 1, 2).reshape(3, 3072), data)
    assert labels.tolist() == [1, 2, 3]
    meta = tmp_path / "meta"
    meta.write_bytes(pickle.dumps({"label_names": ["a", "b"]}, protocol=protocol))
    assert read_cifar_meta(meta) == ["a", "b"]


class _Evil:
    """Unpickling this runs a shell command: the classic pickle payload."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.sentinel))}",))


@robust
@pytest.mark.parametrize("where", ["top-level", "as-data", "as-label"])
def test_malicious_pickle_refused_and_not_executed(tmp_path: Path, where: str) -> None:
    sentinel = tmp_path / "pwned"
    evil = _Evil(sentinel)
    payload = {
        "top-level": evil,
        "as-data": {b"data": evil, b"labels": []},
        "as-label": {b"labels": [evil], b"data": np.zeros((1, 3072), np.uint8)},
    }[where]
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|nt|os)\.system") as excinfo:
        read_cifar_batch(path)
    assert str(path) in one_line_error(excinfo)
    assert not sentinel.exists()
    # Control: the same bytes really do run the command under the stock unpickler.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control), protocol=2))
    assert control.exists()


@robust
@pytest.mark.parametrize(
    ("payload", "name"),
    [
        (b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.", "builtins.eval"),
        (b"\x80\x02c__builtin__\neval\nX\x04\x00\x00\x001+1\x85R.", "__builtin__.eval"),
        (b"\x80\x02cnumpy\nload\nX\x01\x00\x00\x00x\x85R.", "numpy.load"),
        (b"\x80\x02csubprocess\nPopen\nX\x04\x00\x00\x00true\x85R.", "subprocess.Popen"),
    ],
)
def test_restricted_unpickler_refuses_other_globals(tmp_path: Path, payload: bytes, name: str) -> None:
    path = tmp_path / "batches.meta"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=f"refusing to unpickle {name}"):
        read_cifar_meta(path)


@robust
def test_codecs_encode_only_latin1(tmp_path: Path) -> None:
    # _codecs.encode('x', 'rot13') would be harmless, but nothing but latin-1 is needed, so nothing else passes.
    path = tmp_path / "batch"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(DataError, match="rot13"):
        read_cifar_batch(path)


@robust
@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "must be a uint8 numpy array"),
        ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, r"shape \[N, 3072\]"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels but 'data' holds 2 images"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "label 10 at index 1"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]}, "label -1 at index 1"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "missing key 'labels'"),
        ({b"labels": [0]}, "missing key 'data'"),
        ([1, 2, 3], "expected a pickled dict"),
    ],
)
def test_read_cifar_batch_bad_content(tmp_path: Path, batch: object, expected: str) -> None:
    path = tmp_path / "data_batch_3"
    path.write_bytes(py2_pickle(batch))
    with pytest.raises(DataError, match=expected) as excinfo:
        read_cifar_batch(path)
    assert str(path) in one_line_error(excinfo)


@robust
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_read_cifar_batch_corrupt_pickle(tmp_path: Path, damage: str) -> None:
    good = write_cifar(tmp_path / "root", n_per_batch=4) / "test_batch"
    raw = good.read_bytes()
    path = tmp_path / "test_batch"
    path.write_bytes(
        {"truncated": raw[: len(raw) // 2], "garbage": b"\x80\x02\xff\xfe\x00garbage", "empty": b""}[damage]
    )
    with pytest.raises(DataError) as excinfo:
        read_cifar_batch(path)
    assert str(path) in one_line_error(excinfo)


# ========================================================= registry and info


def test_list_and_info() -> None:
    assert list_datasets() == ["cifar10", "fashion-mnist", "mnist"]
    mnist = dataset_info("mnist")
    assert isinstance(mnist, DatasetInfo)
    assert mnist.shape == (1, 28, 28) and mnist.num_classes == 10
    assert mnist.class_names == tuple("0123456789")
    fashion = dataset_info("Fashion_MNIST")  # case and alias insensitive
    assert fashion.name == "fashion-mnist"
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"
    cifar = dataset_info("cifar-10")
    assert cifar.shape == (3, 32, 32) and cifar.class_names == tuple(CIFAR_LABEL_NAMES)
    for info in (mnist, fashion, cifar):
        assert len(info.class_names) == info.num_classes
    with pytest.raises(dataclasses.FrozenInstanceError):
        mnist.num_classes = 3  # type: ignore[misc]


@robust
def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(DataError) as excinfo:
        dataset_info("imagenet")
    assert one_line_error(excinfo) == "unknown dataset 'imagenet'; known datasets: cifar10, fashion-mnist, mnist"
    with pytest.raises(DataError, match="unknown dataset source 'nosuch:'"):
        load_dataset("nosuch:/some/where")


def test_prefix_hook_dispatches_names_with_colon(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 'kind:argument' name goes to the resolver registered for 'kind' (e.g. a future 'folder:PATH')."""
    info = DatasetInfo("dots", 2, ("a", "b"), (1, 2, 2))
    seen: list[str] = []

    def resolve(argument: str) -> sources.DatasetSpec:
        seen.append(argument)
        images = np.zeros((3, 1, 2, 2), np.uint8)
        return sources.DatasetSpec(info=info, load=lambda split, data_dir, download: (images, np.array([0, 1, 1])))

    monkeypatch.setattr(sources, "_PREFIXES", {})
    sources.register_dataset_prefix("dots")(resolve)
    assert dataset_info("dots:/x/y:z").name == "dots"
    ds = load_dataset("dots:/x/y:z", "test")
    assert seen == ["/x/y:z", "/x/y:z"] and len(ds) == 3 and ds.split == "test"


@robust
def test_unknown_split(tiny_data: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "validation")
    assert one_line_error(excinfo) == "unknown split 'validation' for mnist; expected one of: train, test"


# ============================================================== load_dataset


def test_load_tiny_datasets(tiny_data: Path) -> None:
    cases = {"mnist": (64, 32, (1, 28, 28)), "fashion-mnist": (64, 32, (1, 28, 28)), "cifar10": (100, 20, (3, 32, 32))}
    for name, (n_train, n_test, shape) in cases.items():
        for split, n in (("train", n_train), ("test", n_test)):
            ds = load_dataset(name, split)
            assert isinstance(ds, ArrayDataset)
            assert ds.info == dataset_info(name) and ds.split == split and len(ds) == n
            assert ds.images.dtype == torch.uint8 and tuple(ds.images.shape) == (n, *shape)
            assert ds.images.is_contiguous()
            assert ds.labels.dtype == torch.int64 and ds.labels.shape == (n,)
            assert int(ds.labels.min()) >= 0 and int(ds.labels.max()) < 10
            image, label = ds[0]
            assert image.shape == shape and label == int(ds.labels[0])


def test_load_mnist_matches_files(tiny_data: Path) -> None:
    images, labels = read_idx_pair(
        tiny_data / "mnist" / "t10k-images-idx3-ubyte.gz", tiny_data / "mnist" / "t10k-labels-idx1-ubyte.gz"
    )
    ds = load_dataset("mnist", "test")
    assert np.array_equal(ds.images[:, 0].numpy(), images)
    assert np.array_equal(ds.labels.numpy(), labels)


def test_load_cifar_concatenates_batches_in_order(tiny_data: Path) -> None:
    folder = tiny_data / "cifar-10-batches-py"
    expected = np.concatenate([read_cifar_batch(folder / f"data_batch_{k}")[1] for k in range(1, 6)])
    first = read_cifar_batch(folder / "data_batch_1")[0][0]  # HWC
    ds = load_dataset("cifar10", "train")
    assert np.array_equal(ds.labels.numpy(), expected)
    assert np.array_equal(ds.images[0].permute(1, 2, 0).numpy(), first)


def test_ungzipped_idx_names_accepted(tmp_path: Path) -> None:
    folder = write_mnist(tmp_path / "root", n_train=10, n_test=10)
    for gz in folder.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    assert len(load_dataset("mnist", "train", data_dir=tmp_path / "root", download=False)) == 10


def test_debian_fashion_mnist_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's dataset-fashion-mnist installs /usr/share/datasets/fashion-mnist/{train,t10k}-*-ubyte.gz."""
    system = tmp_path / "usr" / "share" / "datasets"
    write_mnist(system, n_train=12, n_test=8, folder="fashion-mnist")
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", (system,))
    assert len(load_dataset("fashion-mnist", "train", download=False)) == 12
    assert len(load_dataset("fashion-mnist", "test", download=False)) == 8


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_env: Path) -> None:
    """data_dir beats $CNNLAB_DATA, which beats the cache, which beats the system dirs."""
    arg, env, system = tmp_path / "arg", tmp_path / "env", tmp_path / "system"
    for root, n in ((arg, 11), (env, 12), (data_env, 13), (system, 14)):
        write_mnist(root, n_train=n, n_test=5)
    monkeypatch.setenv("CNNLAB_DATA", str(env))
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", (system,))
    assert sources.search_roots(arg) == [arg, env, data_env, system]
    assert len(load_dataset("mnist", data_dir=arg, download=False)) == 11
    assert len(load_dataset("mnist", download=False)) == 12
    monkeypatch.delenv("CNNLAB_DATA")
    assert len(load_dataset("mnist", download=False)) == 13
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    assert len(load_dataset("mnist", download=False)) == 14


def test_cache_dir_respects_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert sources.cache_dir() == tmp_path / "cnnlab"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # invalid per the XDG spec: ignored
    assert sources.cache_dir() == Path.home() / ".cache" / "cnnlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert sources.cache_dir() == Path.home() / ".cache" / "cnnlab"


def test_loads_are_independent(tiny_data: Path) -> None:
    """No in-process cache: changing a loaded tensor does not leak into the next load."""
    first = load_dataset("mnist", "test")
    first.images.zero_()
    assert int(load_dataset("mnist", "test").images.max()) == 255


@robust
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_files_message(tmp_path: Path, data_env: Path, name: str) -> None:
    empty = tmp_path / "empty"
    with pytest.raises(DataError) as excinfo:
        load_dataset(name, "test", data_dir=empty, download=False)
    message = one_line_error(excinfo)
    folder = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "cifar10": "cifar-10-batches-py"}[name]
    assert message.startswith(f"{name} not found")
    assert str(empty / folder) in message and str(data_env / folder) in message
    assert "CNNLAB_DATA" in message
    files = (
        ["t10k-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
        if "mnist" in name
        else ["data_batch_5", "test_batch"]
    )
    assert all(f in message for f in files)
    assert not empty.exists()  # a failed lookup creates nothing


@robust
def test_partial_folder_is_not_enough(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path / "root", n_per_batch=2)
    (folder / "data_batch_4").unlink()
    assert len(load_dataset("cifar10", "test", data_dir=tmp_path / "root", download=False)) == 2
    with pytest.raises(DataError, match="cifar10 not found"):
        load_dataset("cifar10", "train", data_dir=tmp_path / "root", download=False)


@robust
def test_download_failure_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        dl, "MNIST_REMOTE", dl.RemoteFiles(mirrors=(f"http://127.0.0.1:{_closed_port()}/",), md5=dl.MNIST_REMOTE.md5)
    )
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", data_dir=tmp_path / "d")
    message = one_line_error(excinfo)
    assert message.startswith("mnist not found and download failed (")
    assert "connect to the internet to download" in message
    assert not (tmp_path / "d").exists()  # no .part file and no empty folder left behind
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError):
        load_dataset("mnist", data_dir=tmp_path / "d")
    assert (tmp_path / "d").is_dir() and not list((tmp_path / "d").iterdir())  # the user's folder stays


@robust
def test_wrong_image_size_in_mnist_folder(tmp_path: Path) -> None:
    folder = write_mnist(tmp_path, n_train=4, n_test=4)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((4, 32, 32), np.uint8))
    with pytest.raises(DataError, match="images are 32x32, expected 28x28 for mnist"):
        load_dataset("mnist", "test", data_dir=tmp_path)


@robust
def test_cifar_meta_of_another_dataset(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path, n_per_batch=2)
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": [b"apple", b"aquarium_fish"]}))
    with pytest.raises(DataError, match="are not CIFAR-10's"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


@robust
def test_malicious_batch_via_load_dataset(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path, n_per_batch=2)
    sentinel = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps(_Evil(sentinel), protocol=2))
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert not sentinel.exists()


@robust
def test_array_dataset_validates() -> None:
    info = dataset_info("mnist")
    good = torch.zeros((2, 1, 28, 28), dtype=torch.uint8)
    with pytest.raises(DataError, match="images have shape"):
        ArrayDataset(torch.zeros((2, 3, 28, 28), dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), info, "train")
    with pytest.raises(DataError, match="contiguous uint8"):
        ArrayDataset(good.float(), torch.zeros(2, dtype=torch.int64), info, "train")
    with pytest.raises(DataError, match="one label per image"):
        ArrayDataset(good, torch.zeros(3, dtype=torch.int64), info, "train")


# ================================================================= downloads


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


class _ShortBodyHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes and sends 10: a connection dropped mid-file."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"0123456789")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def www(tmp_path: Path) -> Path:
    folder = tmp_path / "www"
    folder.mkdir()
    return folder


@pytest.fixture
def server(www: Path) -> Iterator[str]:
    """Base URL of a loopback HTTP server serving the ``www`` folder."""
    yield from _serve(partial(_QuietHandler, directory=str(www)))  # type: ignore[arg-type]


def _closed_port() -> int:
    """A loopback port with nothing listening (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_good(www: Path, server: str, tmp_path: Path) -> None:
    payload = os.urandom(3 * dl.CHUNK_BYTES // 2)  # spans two chunks
    (www / "f.bin").write_bytes(payload)
    dest = tmp_path / "out" / "f.bin"
    assert dl.download(f"{server}/f.bin", dest, hashlib.md5(payload).hexdigest(), progress=False) == dest
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["f.bin"]  # no .part left behind


@robust
def test_download_md5_mismatch_leaves_nothing(www: Path, server: str, tmp_path: Path) -> None:
    (www / "f.bin").write_bytes(b"tampered")
    dest = tmp_path / "out" / "f.bin"
    with pytest.raises(DataError, match="md5 mismatch") as excinfo:
        dl.download(f"{server}/f.bin", dest, "0" * 32, progress=False)
    assert f"{server}/f.bin" in one_line_error(excinfo)
    assert list(dest.parent.iterdir()) == []


@robust
def test_download_md5_mismatch_keeps_existing_file(www: Path, server: str, tmp_path: Path) -> None:
    (www / "f.bin").write_bytes(b"tampered")
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"previous good copy")
    with pytest.raises(DataError):
        dl.download(f"{server}/f.bin", dest, "0" * 32, progress=False)
    assert dest.read_bytes() == b"previous good copy"  # atomic: the old file was never touched


@robust
def test_download_http_404(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "m.gz"
    with pytest.raises(DataError, match="HTTP 404") as excinfo:
        dl.download(f"{server}/missing.gz", dest, "0" * 32, progress=False)
    one_line_error(excinfo)
    assert list(dest.parent.iterdir()) == []


@robust
def test_download_unreachable(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="refused") as excinfo:
        dl.download(f"http://127.0.0.1:{_closed_port()}/x.gz", tmp_path / "x.gz", "0" * 32, progress=False)
    one_line_error(excinfo)
    assert list(tmp_path.iterdir()) == []


@robust
def test_download_connection_dropped(tmp_path: Path) -> None:
    for base in _serve(_ShortBodyHandler):
        with pytest.raises(DataError, match="failed") as excinfo:
            dl.download(f"{base}/x", tmp_path / "x", hashlib.md5(b"0123456789").hexdigest(), progress=False)
        one_line_error(excinfo)
    assert list(tmp_path.iterdir()) == []


@robust
@pytest.mark.parametrize(
    "error",
    [TimeoutError("timed out"), urllib.error.URLError(TimeoutError("timed out")), urllib.error.URLError("no host")],
)
def test_download_timeouts_and_url_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    calls: list[float] = []

    def fake_urlopen(url: str, timeout: float) -> None:
        calls.append(timeout)
        raise error

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(DataError, match="timed out after 30 s|no host") as excinfo:
        dl.download("https://example.invalid/x", tmp_path / "x", "0" * 32, progress=False)
    one_line_error(excinfo)
    assert calls == [30.0]


def test_download_any_falls_back_to_next_mirror(www: Path, server: str, tmp_path: Path) -> None:
    (www / "f").write_bytes(b"hello")
    dest = tmp_path / "f"
    dl.download_any([f"{server}/nope", f"{server}/f"], dest, hashlib.md5(b"hello").hexdigest(), progress=False)
    assert dest.read_bytes() == b"hello"


@robust
def test_download_any_all_fail(server: str, tmp_path: Path) -> None:
    urls = [f"{server}/a", f"http://127.0.0.1:{_closed_port()}/b"]
    with pytest.raises(DataError, match=r"\(2 mirrors tried\)") as excinfo:
        dl.download_any(urls, tmp_path / "f", "0" * 32, progress=False)
    message = one_line_error(excinfo)
    assert urls[0] in message and urls[1] in message


def test_mirror_tables_are_complete() -> None:
    mnist, fashion, cifar = REAL_REMOTES
    for remote in (mnist, fashion):
        assert set(remote.md5) == {
            "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
        }  # fmt: skip
    assert mnist.urls("x") == [
        "https://ossci-datasets.s3.amazonaws.com/mnist/x", "https://storage.googleapis.com/cvdf-datasets/mnist/x",
    ]  # fmt: skip
    assert cifar.urls(dl.CIFAR10_ARCHIVE) == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert all(len(m) == 32 for r in REAL_REMOTES for m in r.md5.values())


def test_load_dataset_downloads_mnist(www: Path, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_mnist(www, n_train=20, n_test=10)  # served as <server>/mnist/<file>
    md5 = {p.name: md5_of(p) for p in source.iterdir()}
    dead = f"http://127.0.0.1:{_closed_port()}/"
    monkeypatch.setattr(dl, "MNIST_REMOTE", dl.RemoteFiles(mirrors=(dead, f"{server}/mnist/"), md5=md5))
    target = tmp_path / "target"
    ds = load_dataset("mnist", "train", data_dir=target)
    assert len(ds) == 20
    assert sorted(p.name for p in (target / "mnist").iterdir()) == sorted(md5)
    # Second load finds the files: no server needed any more.
    monkeypatch.setattr(dl, "MNIST_REMOTE", dl.RemoteFiles(mirrors=(), md5=md5))
    assert len(load_dataset("mnist", "test", data_dir=target)) == 10


def test_download_goes_to_cnnlab_data_then_cache(
    www: Path, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_env: Path
) -> None:
    source = write_mnist(www, n_train=20, n_test=10, folder="fashion-mnist")
    md5 = {p.name: md5_of(p) for p in source.iterdir()}
    monkeypatch.setattr(dl, "FASHION_MNIST_REMOTE", dl.RemoteFiles(mirrors=(f"{server}/fashion-mnist/",), md5=md5))
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "env"))
    load_dataset("fashion-mnist", "test")
    assert (tmp_path / "env" / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file()  # all four files
    assert not data_env.exists()
    monkeypatch.delenv("CNNLAB_DATA")
    load_dataset("fashion-mnist", "test")  # no data_dir, no $CNNLAB_DATA: the cache
    assert (data_env / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").is_file()


@robust
def test_load_dataset_download_md5_mismatch(
    www: Path, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_mnist(www, n_train=20, n_test=10)
    md5 = {p.name: "f" * 32 for p in source.iterdir()}
    monkeypatch.setattr(dl, "MNIST_REMOTE", dl.RemoteFiles(mirrors=(f"{server}/mnist/",), md5=md5))
    with pytest.raises(DataError, match="md5 mismatch") as excinfo:
        load_dataset("mnist", data_dir=tmp_path / "target")
    assert one_line_error(excinfo).startswith("mnist not found and download failed")
    assert [p for p in (tmp_path / "target").rglob("*") if p.is_file()] == []


def _cifar_archive(path: Path, source_root: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return path


def test_load_dataset_downloads_and_extracts_cifar(
    www: Path, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_cifar(tmp_path / "src", n_per_batch=3)
    archive = _cifar_archive(www / dl.CIFAR10_ARCHIVE, tmp_path / "src")
    remote = dl.RemoteFiles(mirrors=(f"{server}/",), md5={dl.CIFAR10_ARCHIVE: md5_of(archive)})
    monkeypatch.setattr(dl, "CIFAR10_REMOTE", remote)
    target = tmp_path / "target"
    assert len(load_dataset("cifar10", "train", data_dir=target)) == 15
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-batches-py"]  # archive and temp dir removed


@robust
def test_extract_tar_refuses_escaping_members(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/../../escaped")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="cannot extract") as excinfo:
        dl.extract_tar(archive, dest)
    one_line_error(excinfo)
    assert not (tmp_path / "escaped").exists()
    assert list(dest.iterdir()) == []  # the temporary directory is gone too


@robust
def test_extract_tar_bad_archives(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not a tar file")
    with pytest.raises(DataError, match="cannot extract"):
        dl.extract_tar(junk, tmp_path / "d1")
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        info = tarfile.TarInfo("something-else/file")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match="no top-level folder 'cifar-10-batches-py'"):
        dl.extract_tar(other, tmp_path / "d2")
    assert list((tmp_path / "d2").iterdir()) == []


@robust
def test_extract_tar_will_not_overwrite(tmp_path: Path) -> None:
    write_cifar(tmp_path / "src", n_per_batch=1)
    archive = _cifar_archive(tmp_path / "a.tar.gz", tmp_path / "src")
    (tmp_path / "dest" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DataError, match="already exists"):
        dl.extract_tar(archive, tmp_path / "dest")


def test_idx_header_helper_matches_spec() -> None:
    """Guards fakedata itself: magic 00 00 08 <ndim>, then big-endian uint32 dims."""
    blob = idx_bytes(np.zeros((2, 3), np.uint8))
    assert blob[:4] == b"\x00\x00\x08\x02" and struct.unpack(">2I", blob[4:12]) == (2, 3) and len(blob) == 18


@robust
def test_translate_too_large_for_the_input_is_a_config_error():
    """Reflect padding mirrors at most side - 1 pixels: a larger translate used to fail at the first step."""
    from cnnlab.data.augment import Augment
    from cnnlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^translate=1000 is too large for the model's 28x28 input: at most 27 "
                                          r"pixels$"):
        Augment(size=(28, 28), translate=1000)
    with pytest.raises(ConfigError, match="translate=12 is too large for the model's 12x20 input: at most 11"):
        Augment(size=(12, 20), translate=12)
    largest = Augment(size=(12, 20), translate=11)
    x = torch.rand(3, 1, 12, 20)
    assert largest(x, torch.Generator().manual_seed(0)).shape == x.shape
