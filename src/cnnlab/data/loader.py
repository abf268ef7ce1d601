"""Training batches from a split: resident (one uint8 tensor in memory or on the device) or streamed.

MNIST and CIFAR-10 stay resident: every batch is one gather from a tensor already on the device. A folder's
images come memory-mapped from the decoded cache (`cnnlab.data.cache`); when they fit the memory budget
(``data_memory_gb``) they are copied in once and used the same way, else each batch is gathered from the
mapping and its pages are handed back to the kernel every so often, so the process's memory stays near the
budget however large the folder is. Both paths take the same rows for the same indices, so a run's batches
depend only on (seed, step), as `cnnlab.train.steps.EpochSampler` orders them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

import numpy as np
import torch

from ..errors import DataError

MADV_DONTNEED = 4  # Linux: drop the pages of a range; file-backed pages are read again on the next access
# A mapped split is copied into memory this much at a time, each part's mapped pages dropped before the next:
# the process then holds the copy plus at most one part of the mapping, not the split twice.
COPY_CHUNK_BYTES = 64 * 2**20


def _mapping_line(address: int) -> list[str] | None:
    """The /proc/self/maps fields (range, perms, offset, dev, inode[, path]) of the mapping holding ``address``."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= address < hi:
                    return fields
    except (OSError, ValueError, IndexError):
        return None
    return None


def _mapping_of(address: int) -> str | None:
    """The file a process address is mapped from ('' for anonymous memory), or None when not known."""
    fields = _mapping_line(address)
    if fields is None:
        return None
    return fields[5].strip() if len(fields) > 5 else ""


class FileRows:
    """Rows of a file-backed tensor read from its file with ``pread``, not through the mapping.

    Streaming a split larger than memory touches rows all over the file; read through the mapping, every row
    costs page faults (and the pages must be handed back to stay in budget), while ``pread`` copies straight
    from the page cache into the batch and leaves nothing mapped. Same bytes either way.
    """

    def __init__(self, fd: int, first: int, stride: int, row_bytes: int):
        self.fd, self.first, self.stride, self.row_bytes = fd, first, stride, row_bytes
        self._closer = weakref.finalize(self, os.close, fd)  # the fd lives as long as the reader

    @classmethod
    def of(cls, t: torch.Tensor) -> FileRows | None:
        """Reader for ``t`` (rows [N, ...], each row contiguous), or None when its file cannot be opened as the
        same file it maps (deleted or replaced since, or not a regular file)."""
        if t.device.type != "cpu" or t.dim() < 2 or t.numel() == 0 or not t[0].is_contiguous():
            return None
        fields = _mapping_line(t.data_ptr())
        if fields is None or len(fields) < 6 or not fields[5].startswith("/"):
            return None
        lo = int(fields[0].split("-")[0], 16)
        try:
            fd = os.open(fields[5].strip(), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        if os.fstat(fd).st_ino != int(fields[4]):
            os.close(fd)
            return None
        size = t.element_size()
        return cls(fd, int(fields[2], 16) + t.data_ptr() - lo, t.stride(0) * size, t[0].numel() * size)

    def read(self, wanted: np.ndarray, out: np.ndarray) -> None:
        """Row ``wanted[k]`` into ``out[k]`` for every k, in ascending file offsets."""
        flat, n = memoryview(out.reshape(-1)).cast("B"), self.row_bytes
        for k in np.argsort(wanted, kind="stable").tolist():
            got = os.preadv(self.fd, [flat[k * n:(k + 1) * n]], self.first + int(wanted[k]) * self.stride)
            if got != self.row_bytes:
                raise DataError(f"the decoded image cache ended early (row {int(wanted[k])}); delete it and retry")

    def close(self) -> None:
        self._closer()


def file_backed(t: torch.Tensor) -> bool:
    """Whether a CPU tensor's memory is a mapping of a file (a memory-mapped cache), not private memory."""
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    where = _mapping_of(t.data_ptr())
    return bool(where) and not where.startswith("[")  # [heap], [stack], [anon:...] are private memory


def drop_pages(t: torch.Tensor) -> None:
    """Let the kernel take back the resident pages of a file-backed tensor (they stay in the page cache).

    Only for read-only use of a mapping: pages of a copy-on-write mapping that were written would revert to
    the file's contents. Pages shared with a neighbouring slice are dropped too and read again when touched.
    """
    if t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    # The bytes from the first element to the last: a strided view (a rank's every other row) spans more than
    # numel * element_size.
    span = (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
    length = t.data_ptr() + span - start
    ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), MADV_DONTNEED)


def copy_to_memory(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """A contiguous copy on ``device`` of a file-backed CPU tensor, without holding the mapping's pages meanwhile.

    Copying reads every page of the mapping into the process, and those pages count in its resident memory
    until they are dropped: copied whole, then dropped, the split is resident twice at the copy's end (or, for
    a GPU, held in host memory as well). Copying in parts of ``COPY_CHUNK_BYTES`` and dropping each part's
    pages right after keeps the extra to one part. The bytes are the same either way.
    """
    out = torch.empty(tuple(images.shape), dtype=images.dtype, device=device)
    if images.numel() == 0:
        return out
    rows = max(1, COPY_CHUNK_BYTES // (images[0].numel() * images.element_size()))
    on_cpu = out.device.type == "cpu"
    source, target = images.numpy(), (out.numpy() if on_cpu else None)
    for i in range(0, len(images), rows):
        if on_cpu:
            target[i:i + rows] = source[i:i + rows]  # numpy: one memcpy per part, no thread pool
        else:
            out[i:i + rows].copy_(images[i:i + rows])
        drop_pages(images[i:i + rows])
    drop_pages(images)  # pages the kernel mapped around the parts read (fault-around) that a part's drop missed
    return out


class BatchSource:
    """Rows of a split by index, as uint8 [B, C, H, W] on ``device``.

    Args:
        images: uint8 [N, C, H, W] (possibly a memory-mapped cache).
        labels: int64 [N].
        device: Where batches go.
        memory_gb: The budget: a split larger than this streams (None or <= 0: always resident).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 memory_gb: float | None = None):
        nbytes = images.numel() * images.element_size()
        self.device = torch.device(device)
        self.streaming = bool(memory_gb and memory_gb > 0 and nbytes > memory_gb * 2**30)
        self.labels = labels.to(self.device)
        if self.streaming:
            self.images = images
            self._mapped = file_backed(images)
            self._file = FileRows.of(images) if self._mapped else None
            # Hand pages back once about half the budget has been read since the last time.
            self._drop_every = max(1, int(memory_gb * 2**30 / 2))
            self._read = 0
        elif file_backed(images):
            self.images = copy_to_memory(images, self.device)  # resident: one copy, no page faults later
        else:
            self.images = images.to(self.device)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images uint8 [B, C, H, W], labels [B]) of rows ``idx``, both on the device."""
        if self.streaming:
            return self._take_streamed(idx.cpu()).to(self.device), self.labels[idx.to(self.device)]
        if self.device.type == "cpu":
            # numpy's row gather is one memcpy per row; torch's indexing of a uint8 tensor runs through its
            # generic index kernel and thread pool, far slower for a batch of whole images on a busy CPU.
            idx = idx.cpu()
            rows = np.take(self.images.numpy(), idx.numpy(), axis=0)
            return torch.from_numpy(rows), self.labels[idx]
        idx = idx.to(self.device)
        return self.images[idx], self.labels[idx]

    def _take_streamed(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` read in ascending file offsets (with `FileRows`, else from the mapping), in the
        sampler's order."""
        wanted = idx.numpy()
        rows = np.empty((len(wanted), *self.images.shape[1:]), dtype=self.images.numpy().dtype)
        if self._file is not None:
            self._file.read(wanted, rows)
            return torch.from_numpy(rows)
        order = np.argsort(wanted, kind="stable")
        source = self.images.numpy()
        rows[order] = np.take(source, wanted[order], axis=0)
        if self._mapped:
            self._read += rows.size
            if self._read >= self._drop_every:
                drop_pages(self.images)
                self._read = 0
        return torch.from_numpy(rows)
