"""Verified, atomic downloads of the built-in datasets' files.

A file is streamed to ``<dest>.part`` next to its destination, its md5 is
checked, it is fsynced and only then renamed onto ``dest`` with
``os.replace``. A half-finished or corrupt download therefore never appears
under the real name. Every failure is a one-line :class:`DataError`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import DataError
from ..io import replace_durably

TIMEOUT_S = 30.0  # per socket operation (connect, each read), not for the whole file
CHUNK_BYTES = 1 << 20  # 1 MiB reads keep memory flat for the 170 MB CIFAR archive


@dataclass(frozen=True)
class RemoteFiles:
    """Where a dataset's files can be downloaded from.

    Attributes:
        mirrors: Base URLs ending in ``/``, tried in order.
        md5: File name -> expected md5 hex digest.
    """

    mirrors: tuple[str, ...]
    md5: Mapping[str, str]

    def urls(self, name: str) -> list[str]:
        """Returns the candidate URLs of one file, in mirror order."""
        return [mirror + name for mirror in self.mirrors]


MNIST_REMOTE = RemoteFiles(
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    md5={
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
)

FASHION_MNIST_REMOTE = RemoteFiles(
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    md5={
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
)

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_REMOTE = RemoteFiles(
    mirrors=("https://www.cs.toronto.edu/~kriz/",),
    md5={CIFAR10_ARCHIVE: "c58f30108f718f92721af3b95e74349a"},
)


def _one_line(exc: BaseException) -> str:
    """Returns a short single-line description of a network or I/O error."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return _one_line(reason) if isinstance(reason, BaseException) else " ".join(str(reason).split())
    if isinstance(exc, TimeoutError):  # socket.timeout is an alias of TimeoutError
        return f"timed out after {TIMEOUT_S:g} s"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


def _stream_to(url: str, part: Path, progress: bool, desc: str) -> str:
    """Streams ``url`` into ``part`` (fsynced) and returns its md5 hex digest."""
    digest = hashlib.md5(usedforsecurity=False)
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, part.open("wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress, leave=False
        ) as bar:
            received = 0  # counted here: a disabled tqdm does not count
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if total is not None and received != total:
            raise http.client.IncompleteRead(b"", total - received)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str, progress: bool = True) -> Path:
    """Downloads one file atomically and verifies its md5.

    Args:
        url: The file's URL (http, https or file).
        dest: Final path; its parent directory is created if needed.
        md5: Expected md5 hex digest of the file's bytes.
        progress: Show a tqdm progress bar (bytes) on stderr.

    Returns:
        ``dest``, which now holds the verified file.

    Raises:
        DataError: Network failure, timeout, HTTP error, or md5 mismatch.
            The temporary ``<dest>.part`` file is removed in every case.
    """
    dest = Path(dest)
    part = dest.with_suffix(dest.suffix + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        actual = _stream_to(url, part, progress, dest.name)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()  # an HTTPError holds the open response (and its socket)
        raise DataError(f"download of {url} to {dest} failed: {_one_line(exc)}") from exc
    if actual != md5.lower():
        part.unlink(missing_ok=True)
        raise DataError(f"download of {url} failed: md5 mismatch (expected {md5}, got {actual}); nothing was saved")
    try:
        replace_durably(part, dest)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise DataError(f"cannot move the download into place at {dest}: {_one_line(exc)}") from exc
    return dest


def download_any(urls: Sequence[str], dest: Path, md5: str, progress: bool = True) -> Path:
    """Tries :func:`download` from each mirror in order until one succeeds.

    Args:
        urls: Candidate URLs of the same file.
        dest: Final path.
        md5: Expected md5 hex digest.
        progress: Show a progress bar.

    Returns:
        ``dest``.

    Raises:
        DataError: Every mirror failed; the message lists each failure.
    """
    if not urls:
        raise DataError(f"no URL to download {Path(dest).name} from")
    failures: list[str] = []
    for url in urls:
        try:
            return download(url, dest, md5, progress=progress)
        except DataError as exc:
            failures.append(str(exc))
    tried = f"{len(urls)} mirror{'s' if len(urls) > 1 else ''} tried"
    raise DataError(f"could not download {Path(dest).name} ({tried}): " + "; ".join(failures))


def extract_tar(archive: Path, dest_dir: Path, folder: str = "cifar-10-batches-py") -> Path:
    """Safely extracts one top-level folder of a tar archive into ``dest_dir``.

    The archive is unpacked with tarfile's ``'data'`` filter (no absolute
    paths, ``..``, device files or links leaving the tree) into a temporary
    directory inside ``dest_dir``; ``folder`` is then renamed into place, so
    a failed extraction leaves nothing half-written under the real name.

    Args:
        archive: The tar file (any compression tarfile understands).
        dest_dir: Directory that receives ``folder``.
        folder: Name of the top-level folder expected in the archive.

    Returns:
        ``dest_dir / folder``.

    Raises:
        DataError: The archive is corrupt, unsafe, lacks ``folder``, or
            ``dest_dir / folder`` already exists.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    target = dest_dir / folder
    if target.exists():
        raise DataError(f"{target} already exists; remove it before extracting {archive} again")
    dest_dir.mkdir(parents=True, exist_ok=True)
    # The temp dir is inside dest_dir so the final rename stays on one filesystem (atomic).
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=dest_dir) as tmp:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{archive}: cannot extract: {_one_line(exc)}") from exc
        extracted = Path(tmp) / folder
        if not extracted.is_dir():
            raise DataError(f"{archive}: archive has no top-level folder '{folder}'")
        replace_durably(extracted, target)
    return target
