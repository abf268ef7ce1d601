"""Training batches from a decoded cache: the peak memory of copying a mapped split in (resident), and rows
read from the file when streamed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from cnnlab.data.cache import cached_array
from cnnlab.data.loader import COPY_CHUNK_BYTES, BatchSource, FileRows, copy_to_memory

SHAPE = (1700, 3, 224, 224)  # 256 MB of decoded images: big enough that a copy held twice stands out
KEY = "0" * 32

# In a fresh process, so that the peak resident memory (VmHWM) is this copy's alone: map the cache as every
# command does, reset the peak, copy the split in as resident training does, report the peak's growth.
COPY_IN_CHILD = r"""
import json, sys
from pathlib import Path
import torch
from cnnlab.data.cache import cached_array
from cnnlab.data.loader import BatchSource

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

root, key, shape = Path(sys.argv[1]), sys.argv[2], tuple(json.loads(sys.argv[3]))
mapped = torch.from_numpy(cached_array(key, shape, fill=None, root=root))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := the current RSS: what follows is the copy's own peak
before = status("VmRSS")
source = BatchSource(mapped, torch.zeros(shape[0], dtype=torch.int64), torch.device("cpu"), memory_gb=0)
growth = status("VmHWM") - before
print(json.dumps({"growth": growth, "resident": not source.streaming,
                  "equal": bool(source.images.equal(mapped)), "checksum": int(source.images[:, 0, 0, 0].sum())}))
"""


def _write_cache(root: Path) -> np.ndarray:
    """A decoded-cache file of SHAPE whose rows differ (row i filled with i mod 251); returns the first pixel of
    each row."""
    first = np.arange(SHAPE[0]) % 251

    def fill(write_row):
        for i in range(SHAPE[0]):
            write_row(i, np.full(SHAPE[1:], first[i], dtype=np.uint8))

    assert cached_array(KEY, SHAPE, fill, root=root) is not None
    return first


def test_copying_a_mapped_split_in_holds_it_once_not_twice(tmp_path):
    """Copied whole from the mapping, the split was resident twice at the copy's end (the copy and every mapped
    page it read); copied in parts with each part's pages dropped, the peak grows by the split plus one part."""
    first = _write_cache(tmp_path)
    nbytes = int(np.prod(SHAPE))
    out = subprocess.run([sys.executable, "-c", COPY_IN_CHILD, str(tmp_path), KEY, json.dumps(SHAPE)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["resident"] and r["equal"] and r["checksum"] == int(first.sum())
    bound = nbytes + COPY_CHUNK_BYTES + 32 * 2**20  # the copy, one part's mapped pages, allocator slack
    assert r["growth"] < bound, (f"copying a {nbytes / 2**20:.0f} MiB split in grew the peak RSS by "
                                 f"{r['growth'] / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB)")


def test_a_copy_in_parts_is_the_same_tensor_for_whole_and_strided_splits(tmp_path, monkeypatch):
    from cnnlab.data import loader
    monkeypatch.setattr(loader, "COPY_CHUNK_BYTES", 3 * 8 * 8 * 3)  # three rows a part: the last part is short
    rows = np.random.default_rng(0).integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    mapped = cached_array("1" * 32, rows.shape, lambda write: [write(i, r) for i, r in enumerate(rows)],
                          root=tmp_path)
    images = torch.from_numpy(mapped)
    for view in (images, images[1::2], images[:0]):  # a whole split, a torchrun rank's share, an empty one
        copy = copy_to_memory(view)
        assert copy.is_contiguous() and copy.equal(view)
        assert copy.data_ptr() != view.data_ptr() or view.numel() == 0


def test_streamed_batches_are_read_from_the_file_and_equal_the_mapped_rows(tmp_path, monkeypatch):
    """A streamed split reads its rows with pread (nothing mapped, nothing to hand back); the batches are the
    mapping's rows in the sampler's order, for a whole split and a torchrun rank's strided share, and the
    mapping path (a cache file replaced since it was mapped) gives the same."""
    from cnnlab.data import loader

    rows = np.random.default_rng(1).integers(0, 256, (40, 3, 8, 8), dtype=np.uint8)
    mapped = torch.from_numpy(cached_array("2" * 32, rows.shape, lambda write: [write(i, r) for i, r in
                                                                               enumerate(rows)], root=tmp_path))
    labels = torch.arange(40)
    order = torch.from_numpy(np.random.default_rng(2).permutation(40))
    for view, want in ((mapped, rows), (mapped[1::2], rows[1::2])):
        source = BatchSource(view, labels[:len(view)], torch.device("cpu"), memory_gb=1e-9)
        assert source.streaming and source._file is not None
        idx = order[order < len(view)][:13]
        x, y = source.take(idx)
        assert np.array_equal(x.numpy(), want[idx.numpy()]) and y.equal(idx)
    with monkeypatch.context() as m:
        m.setattr(loader.FileRows, "of", classmethod(lambda cls, t: None))  # as for a replaced or deleted file
        source = BatchSource(mapped, labels, torch.device("cpu"), memory_gb=1e-9)
        assert source._file is None
        assert np.array_equal(source.take(order[:13])[0].numpy(), rows[order[:13].numpy()])


def test_a_cache_file_replaced_since_it_was_mapped_is_not_read(tmp_path):
    rows = np.zeros((4, 3, 2, 2), dtype=np.uint8)
    mapped = torch.from_numpy(cached_array("3" * 32, rows.shape, lambda write: [write(i, r) for i, r in
                                                                               enumerate(rows)], root=tmp_path))
    path = tmp_path / ("3" * 32 + ".npy")
    replacement = tmp_path / "other.npy"
    np.save(replacement, np.ones_like(rows))
    replacement.replace(path)  # a new inode under the old name
    assert FileRows.of(mapped) is None
    assert FileRows.of(torch.zeros(4, 3, 2, 2, dtype=torch.uint8)) is None  # private memory: no file
