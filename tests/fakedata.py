"""Tiny datasets written in the exact on-disk formats of the real ones, for tests.

* :func:`write_mnist` writes the four gzip-compressed IDX files of MNIST
  (or Fashion-MNIST, with ``folder='fashion-mnist'``).
* :func:`write_cifar` writes ``cifar-10-batches-py/`` with Python-2 style
  protocol-2 pickles byte-for-byte as cPickle wrote the official batches
  (bytes keys, ``SHORT_BINSTRING``/``BINSTRING`` strings, ``numpy.core``
  globals), so the reader is tested against what real files contain rather
  than what Python 3's pickler would produce.

Images are not pure noise: each class has its own bright square (MNIST) or
dominant colour (CIFAR), so a model trained on them can learn something.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np

MNIST_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """Returns the IDX encoding of a uint8 array: magic, big-endian dims, raw data."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Writes ``array`` as an IDX file, gzip-compressed (like the distributed files) unless told not to."""
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def _balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """Returns n labels in 0..9, as evenly spread over the classes as n allows, shuffled."""
    return rng.permutation(np.arange(n) % 10).astype(np.uint8)


def _mnist_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Returns uint8 [N, 28, 28]: faint noise plus an 8x8 bright square whose place encodes the label."""
    images = rng.integers(0, 40, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)  # classes on a 2x5 grid of squares
        images[i, 4 + 12 * row : 12 + 12 * row, 1 + 5 * col : 6 + 5 * col] = 255
    return images


def write_mnist(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0, folder: str = "mnist") -> Path:
    """Writes a tiny MNIST in the real layout: ``root/<folder>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.

    Args:
        root: Data root (created if needed).
        n_train: Number of train images.
        n_test: Number of test images.
        seed: Seed of the pixel noise and the label order.
        folder: ``'mnist'``, or ``'fashion-mnist'`` for the same format under that name.

    Returns:
        The folder holding the four files.
    """
    rng = np.random.default_rng(seed)
    out = Path(root) / folder
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = _balanced_labels(n, rng)
        images_stem, labels_stem = MNIST_STEMS[split]
        write_idx(out / f"{images_stem}.gz", _mnist_images(labels, rng))
        write_idx(out / f"{labels_stem}.gz", labels)
    return out


# -------------------------------------------------- Python-2 style pickle writer


class Py2Pickler:
    """Writes protocol-2 pickles opcode for opcode as Python 2's cPickle did for the CIFAR batches.

    Supports dict (insertion order), list, int, bool, None, bytes (a Python-2
    ``str``) and numpy arrays of simple dtypes. Strings are memoized by value,
    containers by identity; appends and setitems go in batches of 1000.
    """

    BATCH = 1000

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.memo: dict[Any, int] = {}

    def dumps(self, obj: Any) -> bytes:
        self.save(obj)
        self.out += b"."  # STOP
        return bytes(self.out)

    def put(self, key: Any) -> None:
        index = len(self.memo) + 1  # cPickle numbers memo entries from 1
        self.memo[key] = index
        self.out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)  # BINPUT / LONG_BINPUT

    def save(self, obj: Any) -> None:
        if obj is None:
            self.out += b"N"
        elif isinstance(obj, bool):
            self.out += b"\x88" if obj else b"\x89"  # NEWTRUE / NEWFALSE
        elif isinstance(obj, int):
            self.save_int(obj)
        elif isinstance(obj, bytes):
            self.save_bytes(obj)
        elif isinstance(obj, list):
            self.out += b"]"  # EMPTY_LIST
            self.put(("list", id(obj)))
            self.save_batched([[item] for item in obj], single=b"a", many=b"e")  # APPEND / APPENDS
        elif isinstance(obj, dict):
            self.out += b"}"  # EMPTY_DICT
            self.put(("dict", id(obj)))
            self.save_batched([[k, v] for k, v in obj.items()], single=b"s", many=b"u")  # SETITEM / SETITEMS
        elif isinstance(obj, np.ndarray):
            self.save_array(obj)
        else:
            raise TypeError(f"Py2Pickler cannot write {type(obj).__name__}")

    def save_int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])  # BININT1
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)  # BININT2
        else:
            self.out += b"J" + struct.pack("<i", value)  # BININT (signed 32-bit)

    def save_bytes(self, value: bytes) -> None:
        key = ("str", value)
        if key in self.memo:
            index = self.memo[key]
            self.out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)  # BINGET
            return
        if len(value) < 256:
            self.out += b"U" + bytes([len(value)]) + value  # SHORT_BINSTRING
        else:
            self.out += b"T" + struct.pack("<i", len(value)) + value  # BINSTRING
        self.put(key)

    def save_batched(self, groups: list[list[Any]], single: bytes, many: bytes) -> None:
        for start in range(0, len(groups), self.BATCH):
            chunk = groups[start : start + self.BATCH]
            if len(chunk) > 1:
                self.out += b"("  # MARK
            for group in chunk:
                for item in group:
                    self.save(item)
            self.out += many if len(chunk) > 1 else single

    def save_tuple(self, items: tuple[Any, ...]) -> None:
        short = {1: b"\x85", 2: b"\x86", 3: b"\x87"}  # TUPLE1..3
        if len(items) not in short:
            self.out += b"("
        for item in items:
            self.save(item)
        self.out += short.get(len(items), b"t")  # TUPLE
        self.put(("tuple", id(items), len(self.memo)))

    def save_global(self, module: str, name: str) -> None:
        self.out += b"c" + f"{module}\n{name}\n".encode()  # GLOBAL
        self.put(("global", module, name))

    def save_array(self, array: np.ndarray) -> None:
        """ndarray.__reduce__ of numpy 1.x under Python 2: _reconstruct(ndarray, (0,), 'b') then BUILD state."""
        array = np.ascontiguousarray(array)
        self.save_global("numpy.core.multiarray", "_reconstruct")
        self.save_global("numpy", "ndarray")
        self.save_tuple((0,))
        self.save_bytes(b"b")
        self.out += b"\x87"  # TUPLE3 of the three above
        self.put(("args", id(array)))
        self.out += b"R"  # REDUCE
        self.put(("array", id(array)))
        self.out += b"("  # MARK: state (version 1, shape, dtype, fortran order, raw bytes)
        self.save_int(1)
        self.save_tuple(tuple(int(d) for d in array.shape))
        self.save_dtype(array.dtype)
        self.out += b"\x89"  # NEWFALSE: C order
        self.save_bytes(array.tobytes())
        self.out += b"t"
        self.put(("state", id(array)))
        self.out += b"b"  # BUILD

    def save_dtype(self, dtype: np.dtype) -> None:
        """dtype.__reduce__: dtype('u1', 0, 1) then BUILD (3, byteorder, None, None, None, -1, -1, 0)."""
        self.save_global("numpy", "dtype")
        self.save_bytes(dtype.str[1:].encode())  # e.g. 'u1', 'i8'
        self.save_int(0)
        self.save_int(1)
        self.out += b"\x87"
        self.put(("dtype-args", id(dtype), len(self.memo)))
        self.out += b"R"
        self.put(("dtype", id(dtype), len(self.memo)))
        self.out += b"("
        self.save_int(3)
        self.save_bytes(dtype.str[0].encode())  # '|' for 1-byte types, '<' little-endian
        self.out += b"NNN"  # no subarray, names or fields
        self.save_int(-1)
        self.save_int(-1)
        self.save_int(0)
        self.out += b"t"
        self.put(("dtype-state", id(dtype), len(self.memo)))
        self.out += b"b"


def py2_pickle(obj: Any) -> bytes:
    """Returns ``obj`` pickled as Python 2's cPickle.dump(obj, f, 2) would write it."""
    return Py2Pickler().dumps(obj)


# ------------------------------------------------------------------------ CIFAR


def cifar_batch_dict(images_hwc: np.ndarray, labels: np.ndarray, batch_label: str) -> dict[bytes, Any]:
    """Builds the dict of a CIFAR-10 batch in the official key order, with bytes keys.

    Args:
        images_hwc: uint8 [N, 32, 32, 3].
        labels: N ints in 0..9.
        batch_label: E.g. ``'training batch 1 of 5'``.
    """
    # Each row is the R plane, then G, then B, each 32x32 row-major: HWC -> CHW -> flat 3072.
    data = np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2)).reshape(len(images_hwc), 3072)
    names = [f"{i}_{CIFAR_LABEL_NAMES[int(y)]}.png".encode() for i, y in enumerate(labels)]
    return {
        b"batch_label": batch_label.encode(),
        b"labels": [int(y) for y in labels],
        b"data": data,
        b"filenames": names,
    }


def cifar_meta_dict() -> dict[bytes, Any]:
    """Builds the dict of the official ``batches.meta``."""
    return {
        b"num_cases_per_batch": 10000,
        b"label_names": [n.encode() for n in CIFAR_LABEL_NAMES],
        b"num_vis": 3072,
    }


def _cifar_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Returns uint8 [N, 32, 32, 3]: noise around a colour that depends on the label."""
    palette = np.array([[(k * 97) % 256, (k * 53 + 80) % 256, (k * 29 + 160) % 256] for k in range(10)], np.int16)
    noise = rng.integers(-30, 31, size=(len(labels), 32, 32, 3), dtype=np.int16)
    return np.clip(palette[labels.astype(np.int64)][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def write_cifar(root: Path, n_per_batch: int = 20, seed: int = 0) -> Path:
    """Writes a tiny CIFAR-10 in the real layout: ``root/cifar-10-batches-py/`` with
    ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``.

    Args:
        root: Data root (created if needed).
        n_per_batch: Images in each of the six batches.
        seed: Seed of the pixels and label order.

    Returns:
        The ``cifar-10-batches-py`` folder.
    """
    rng = np.random.default_rng(seed)
    out = Path(root) / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    names = [(f"data_batch_{k}", f"training batch {k} of 5") for k in range(1, 6)]
    for filename, batch_label in [*names, ("test_batch", "testing batch 1 of 1")]:
        labels = _balanced_labels(n_per_batch, rng)
        batch = cifar_batch_dict(_cifar_images(labels, rng), labels, batch_label)
        (out / filename).write_bytes(py2_pickle(batch))
    (out / "batches.meta").write_bytes(py2_pickle(cifar_meta_dict()))
    return out
