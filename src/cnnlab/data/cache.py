"""Decoded images on disk: one uint8 ``.npy`` per (file list, decode options), memory-mapped by every command.

A folder is decoded once; ``train``, ``evaluate``, ``report`` and ``export`` then map the same file (as
Ultralytics' ``cache=disk`` or FFCV's ``.beton``). The key hashes each file's path, mtime and size with the
options that change pixels, so an edited, added or removed file decodes the split again. Writes go to a
temporary file renamed into place; an exclusive ``flock`` on ``<key>.lock`` makes the other torchrun ranks
(or commands) wait for the first writer and then map its file instead of decoding their own copy.

Files live under ``$XDG_CACHE_HOME/cnnlab/decoded`` (``~/.cache/cnnlab/decoded``) and may be deleted at any time.
Each use touches its file's mtime; writing a new one deletes those unused for ``UNUSED_DAYS`` (old sizes, edited
folders), and temporary files a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sources import cache_dir

CACHE_VERSION = 1  # bump when the decoding of a file changes, so old caches are not reused
UNUSED_DAYS = 30  # a decoded split nobody mapped for this long is deleted when another one is written
RowWriter = Callable[[int, np.ndarray], None]


def decoded_dir() -> Path:
    """Where decoded splits are kept."""
    return cache_dir() / "decoded"


def cache_key(files: Sequence[Path], options: dict) -> str:
    """A hex digest of the files (path, mtime, size, in order) and the decode ``options`` (JSON-able)."""
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **options}, sort_keys=True).encode())
    folders: dict[str, str] = {}  # each folder resolved once: resolving every file costs a syscall per path part
    for p in files:
        parent, name = os.path.split(os.fspath(p))
        if parent not in folders:
            folders[parent] = os.path.realpath(parent or ".")
        try:
            st = os.stat(p)
        except OSError as e:
            raise DataError(f"{p}: cannot read ({e.strerror})") from None
        h.update(f"{folders[parent]}/{name}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    return h.hexdigest()[:32]


def _lock(lock_path: Path) -> int | None:
    """An fd holding an exclusive flock on ``lock_path`` (waits for the holder), or None if it cannot be made.

    The kernel releases the lock when the fd is closed or the process dies, so a killed writer never leaves
    the others waiting.
    """
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.utime(fd)  # a lock in use is never old enough for `_prune`
    except OSError:
        os.close(fd)
        return None
    return fd


def _open_existing(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached array mapped copy-on-write (writable, so torch takes it without a copy), or None if absent or
    not of ``shape`` (a truncated or foreign file is decoded again)."""
    if not path.is_file():
        return None
    try:
        a = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if a.dtype != np.uint8 or a.shape != tuple(shape):
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # marks it as in use, for `_prune`
    return a


def cached_array(key: str, shape: tuple[int, ...], fill: Callable[[RowWriter], None],
                 root: Path | None = None) -> np.ndarray | None:
    """The uint8 array ``shape`` stored under ``key``, made by ``fill(write_row)`` on a miss.

    Args:
        key: From `cache_key`.
        shape: [N, ...] of the array; ``write_row(i, row)`` stores row i (shape[1:], uint8). Rows may be
            written from several threads at once.
        fill: Writes every row.
        root: The cache folder (default `decoded_dir`).

    Returns:
        A memory-mapped array (pages are read on demand and shared by every process mapping the file), or
        None when the cache folder cannot be created or locked (a read-only home): decode into memory then.

    Raises:
        DataError: The disk has no room for the array, or writing it failed.
    """
    root = root or decoded_dir()
    final = root / f"{key}.npy"
    found = _open_existing(final, shape)
    if found is not None:
        return found
    fd = _lock(root / f"{key}.lock")
    if fd is None:
        return None
    nbytes = int(np.prod(shape, dtype=np.int64))
    try:
        found = _open_existing(final, shape)  # another rank or command wrote it while this one waited
        if found is not None:
            return found
        free = shutil.disk_usage(root).free
        if nbytes > free:
            raise DataError(f"decoded images need {nbytes / 2**30:.1f} GiB in {root}, only {free / 2**30:.1f} GiB "
                            "free; pick a smaller size= or set XDG_CACHE_HOME to a larger disk")
        _write(final, shape, fill)
        _prune(root, keep=final)
    finally:
        os.close(fd)  # releases the lock
    return _open_existing(final, shape)


def _prune(root: Path, keep: Path, now: float | None = None) -> None:
    """Delete cache files unused for ``UNUSED_DAYS``, and temporary files over a day old (a killed writer's)."""
    now = time.time() if now is None else now
    for p in root.iterdir():
        try:
            age_days = (now - p.stat().st_mtime) / 86400
        except OSError:  # deleted meanwhile by another process
            continue
        if p != keep and age_days > (1 if ".tmp-" in p.name else UNUSED_DAYS):
            with contextlib.suppress(OSError):
                p.unlink()


def _write(final: Path, shape: tuple[int, ...], fill: Callable[[RowWriter], None]) -> None:
    """Create ``final`` atomically: header and rows into a temporary file, fsync, rename."""
    tmp = final.with_name(f"{final.stem}.tmp-{os.getpid()}.npy")
    try:
        header = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=tuple(shape))
        offset = header.offset  # where row data starts: after the .npy header
        del header  # a sparse file of the right length; rows are written with pwrite, not through a mapping
        row_bytes = int(np.prod(shape[1:], dtype=np.int64))
        fd = os.open(tmp, os.O_RDWR)
        try:
            def write_row(i: int, row: np.ndarray) -> None:
                data = np.ascontiguousarray(row, dtype=np.uint8)  # pwrite reads the array's buffer: no copy
                if data.nbytes != row_bytes:
                    raise ValueError(f"row {i} has {data.nbytes} bytes, expected {row_bytes}")
                os.pwrite(fd, data, offset + i * row_bytes)

            fill(write_row)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError as e:
        raise DataError(f"cannot write the image cache {final}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def cached_json(key: str, compute: Callable[[], object], root: Path | None = None) -> object:
    """A small JSON value stored under ``key`` (e.g. what a folder's headers say), computed on a miss.

    A cache that cannot be read or written only costs the computation.
    """
    path = (root or decoded_dir()) / f"{key}.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    value = compute()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.json")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
    return value
