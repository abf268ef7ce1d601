"""Readers for the on-disk formats of the built-in datasets.

Two formats are supported:

* IDX (MNIST, Fashion-MNIST): a 4-byte magic ``00 00 <type> <ndim>``, then
  ``ndim`` big-endian uint32 dimensions, then the raw row-major data. Files
  may be gzip-compressed; compression is detected from the content, not the name.
* CIFAR-10 "python version" batches: Python-2 style protocol-2 pickles of a
  dict with ``data`` (uint8 [N, 3072], R, G, B planes, each 32x32 row-major)
  and ``labels`` (list of N ints). They are read with a restricted unpickler
  that can only rebuild a numpy array, so a hostile file cannot run code.

Every problem is reported as a one-line :class:`~cnnlab.errors.DataError`
that names the file.
"""

from __future__ import annotations

import codecs
import gzip
import os
import pickle
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

PathLike = str | os.PathLike[str]

# IDX header: two zero bytes, a type code, the number of dimensions.
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UBYTE = 0x08
_IDX_TYPE_NAMES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
_IDX_MAX_NDIM = 4

# CIFAR-10 constants: 32x32 RGB images stored as 3 planes of 1024 bytes each.
CIFAR_SIDE = 32
CIFAR_CHANNELS = 3
CIFAR_ROW_BYTES = CIFAR_CHANNELS * CIFAR_SIDE * CIFAR_SIDE  # 3072
CIFAR_NUM_CLASSES = 10


# --------------------------------------------------------------------------- IDX


def _read_bytes(path: Path) -> bytes:
    """Returns the file's content, gunzipped when it starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError as exc:  # stream cut before the end-of-stream marker
        raise DataError(f"{path}: corrupt gzip data: file is truncated ({exc})") from exc
    except (OSError, zlib.error) as exc:  # BadGzipFile (CRC, length, header) is an OSError
        raise DataError(f"{path}: corrupt gzip data: {exc}") from exc


def _parse_idx_header(path: Path, data: bytes) -> tuple[int, tuple[int, ...]]:
    """Validates the IDX header and returns (header length in bytes, dims)."""
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file: only {len(data)} bytes, the header needs at least 4")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise DataError(f"{path}: not an IDX file: bad magic {data[:4].hex(' ')} (must start with 00 00)")
    if type_code != _IDX_UBYTE:
        kind = _IDX_TYPE_NAMES.get(type_code, "unknown")
        raise DataError(f"{path}: unsupported IDX type code 0x{type_code:02x} ({kind}); only 0x08 (uint8) is supported")
    if not 1 <= ndim <= _IDX_MAX_NDIM:
        raise DataError(f"{path}: bad IDX header: {ndim} dimensions, expected 1 to {_IDX_MAX_NDIM}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(
            f"{path}: truncated IDX header: expected {header_len} bytes for {ndim} dimensions, found {len(data)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    return header_len, dims


def read_idx(path: PathLike) -> np.ndarray:
    """Reads an IDX file of unsigned bytes, plain or gzip-compressed.

    Args:
        path: The file. Gzip compression is detected by the magic bytes
            ``1f 8b``, so the name does not matter.

    Returns:
        A writable, C-contiguous uint8 array whose shape is the file's dims.

    Raises:
        DataError: The file is unreadable, the gzip stream is corrupt, the
            header is not an IDX uint8 header with 1 to 4 dims, or the data
            size is not exactly the product of the dims.
    """
    path = Path(path)
    data = _read_bytes(path)
    header_len, dims = _parse_idx_header(path, data)
    expected = int(np.prod(dims, dtype=np.int64))
    found = len(data) - header_len
    if found < expected:
        raise DataError(f"{path}: truncated: expected {expected} bytes of data, found {found}")
    if found > expected:
        raise DataError(
            f"{path}: {found - expected} unexpected trailing bytes: expected {expected} bytes of data, found {found}"
        )
    # frombuffer is a zero-copy view of immutable bytes; copy once so callers own a writable array.
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header_len).reshape(dims).copy()


def read_idx_pair(images_path: PathLike, labels_path: PathLike, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Reads a matching pair of IDX image and label files.

    Args:
        images_path: IDX file of shape [N, H, W].
        labels_path: IDX file of shape [N].
        num_classes: Labels must lie in ``0 .. num_classes - 1``.

    Returns:
        ``(images, labels)``: uint8 [N, H, W] and int64 [N].

    Raises:
        DataError: Either file is bad, the ranks are wrong, the counts
            differ, or a label is out of range.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected images of shape [N, H, W], found shape {list(images.shape)}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of shape [N], found shape {list(labels.shape)}")
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels but {images_path} holds {len(images)} images")
    _check_label_range(Path(labels_path), labels, num_classes)
    return images, labels.astype(np.int64)


def _check_label_range(path: Path, labels: np.ndarray, num_classes: int) -> None:
    """Raises DataError naming the first label outside ``0 .. num_classes - 1``."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{path}: label {int(labels[i])} at index {i} is out of range 0..{num_classes - 1}"
            f" ({bad.size} bad labels in all)"
        )


# ------------------------------------------------------------------------ CIFAR


def _numpy_core_attr(name: str) -> Any:
    """Returns ``numpy._core.multiarray.<name>`` (numpy 2) or ``numpy.core.multiarray.<name>`` (numpy 1).

    Resolving both spellings to the real module avoids importing the
    deprecated ``numpy.core`` shim, which warns under numpy 2.
    """
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    return getattr(multiarray, name)


def _numpy_frombuffer() -> Any:
    """Returns numpy's internal ``_frombuffer`` used by protocol-5 array pickles."""
    try:
        from numpy._core import numeric
    except ImportError:  # numpy < 2
        from numpy.core import numeric  # type: ignore[no-redef]
    return numeric._frombuffer


_LATIN1_NAMES = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"})


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Restricted ``_codecs.encode``: Python-3 protocol-2 pickles store bytes as ``encode(str, 'latin1')``.

    Only latin-1 is admitted, so a pickle cannot reach arbitrary codecs.
    """
    if not isinstance(obj, str) or encoding.lower() not in _LATIN1_NAMES:
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(obj, encoding, errors)


# (module, name) -> factory returning the object; the only globals a pickle may load.
_ALLOWED_GLOBALS: Mapping[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_core_attr("_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_core_attr("_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_core_attr("scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_core_attr("scalar"),
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that can only build numpy arrays, dicts, lists and plain values.

    ``find_class`` is the only way a pickle reaches code; refusing every
    global outside ``_ALLOWED_GLOBALS`` blocks ``os.system``-style payloads
    before anything is called.

    It extends the pure-Python unpickler, not the C one: the C unpickler keeps its memo in an array that a
    ``LONG_BINPUT`` opcode resizes to the 4-byte index it names, so one flipped byte in a 150-byte file
    made it allocate and zero several GB. The Python unpickler's memo is a dict. On CIFAR's batches (a few large
    strings and ~30k small opcodes) it measured no slower than the C one.
    """

    def __init__(self, file: Any, path: Path) -> None:
        # encoding='bytes' keeps Python-2 str as bytes, which numpy needs for the raw array data.
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise DataError(f"{self._path}: refusing to unpickle {module}.{name} (only numpy arrays are allowed)")
        return factory()

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._path}: refusing to unpickle a persistent id")


def _unpickle(path: Path) -> Any:
    """Loads a pickle with the restricted unpickler; any failure becomes a DataError."""
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except EOFError as exc:
        raise DataError(f"{path}: not a valid pickle: file is truncated") from exc
    except Exception as exc:  # UnpicklingError, ValueError, TypeError... from malformed streams
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a valid CIFAR pickle: {message}") from exc


def _str_keys(path: Path, obj: Any) -> dict[str, Any]:
    """Returns the unpickled dict with keys as str (real files use Python-2 bytes keys)."""
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _require(path: Path, batch: Mapping[str, Any], key: str) -> Any:
    """Returns ``batch[key]`` or raises a DataError naming the missing key."""
    if key not in batch:
        found = ", ".join(sorted(batch)) or "none"
        raise DataError(f"{path}: missing key '{key}' (found keys: {found})")
    return batch[key]


def _cifar_labels(path: Path, raw: Any, count: int) -> np.ndarray:
    """Validates the ``labels`` entry: N ints in 0..9. Returns int64 [N]."""
    try:
        labels = np.asarray(raw)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'labels' is not a list of integers") from exc
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: 'labels' must be a flat list of integers, found {labels.dtype} {list(labels.shape)}")
    if len(labels) != count:
        raise DataError(f"{path}: {len(labels)} labels but 'data' holds {count} images")
    labels = labels.astype(np.int64)
    _check_label_range(path, labels, CIFAR_NUM_CLASSES)
    return labels


def read_cifar_batch(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 python batch (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).

    Args:
        path: The pickle file. Bytes or str keys are both accepted.

    Returns:
        ``(images, labels)``: uint8 [N, 32, 32, 3] (HWC; a transposed view
        of the stored planes, so ``images.transpose(0, 3, 1, 2)`` is a
        C-contiguous NCHW array without copying) and int64 [N].

    Raises:
        DataError: The pickle is corrupt, asks for anything but numpy
            arrays, or its data or labels have the wrong type, shape or range.
    """
    path = Path(path)
    batch = _str_keys(path, _unpickle(path))
    data = _require(path, batch, "data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 numpy array, found {kind}")
    if data.ndim != 2 or data.shape[1] != CIFAR_ROW_BYTES:
        raise DataError(f"{path}: 'data' must have shape [N, {CIFAR_ROW_BYTES}], found {list(data.shape)}")
    labels = _cifar_labels(path, _require(path, batch, "labels"), len(data))
    # Each row is R, G, B planes of 32x32 row-major pixels: [N, C, H, W] -> HWC view.
    planes = np.ascontiguousarray(data).reshape(-1, CIFAR_CHANNELS, CIFAR_SIDE, CIFAR_SIDE)
    return planes.transpose(0, 2, 3, 1), labels


def read_cifar_meta(path: PathLike) -> list[str]:
    """Reads ``label_names`` from a CIFAR-10 ``batches.meta`` pickle.

    Args:
        path: The ``batches.meta`` file.

    Returns:
        The class names in label order, e.g. ``['airplane', ..., 'truck']``.

    Raises:
        DataError: The pickle is bad or has no list of names.
    """
    path = Path(path)
    meta = _str_keys(path, _unpickle(path))
    names = _require(path, meta, "label_names")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{path}: 'label_names' must be a list of strings")
    return [n.decode("utf-8", errors="replace") if isinstance(n, bytes) else n for n in names]
