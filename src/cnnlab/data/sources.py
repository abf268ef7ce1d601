"""Built-in datasets: their metadata, where their files are found, and how they load.

Datasets live in a registry filled by the :func:`register_dataset`
decorator. A name containing ``':'`` (e.g. ``'folder:/path/to/images'``) is
dispatched on its prefix to a resolver registered with
:func:`register_dataset_prefix`, so new kinds of sources plug in without
touching this module's dispatch code.

Files are looked for, in order, under:

1. the ``data_dir`` argument,
2. ``$CNNLAB_DATA``,
3. ``$XDG_CACHE_HOME/cnnlab`` (default ``~/.cache/cnnlab``),
4. ``/usr/share/datasets`` (where Debian's ``dataset-fashion-mnist`` installs).

Within a root, each dataset has its own folder: ``mnist/``,
``fashion-mnist/`` (the four IDX files, ``.gz`` or not) and
``cifar-10-batches-py/`` (the python batches). Nothing is cached in memory
between calls: each :func:`load_dataset` reads the files again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, UnknownSplitError
from . import download as dl
from .formats import read_cifar_batch, read_cifar_meta, read_idx_pair

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

SPLITS: tuple[str, ...] = ("train", "test")
DATA_ENV = "CNNLAB_DATA"
# Read-only system locations searched last; a module constant so tests can point it elsewhere.
SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)


# ---------------------------------------------------------------- public types


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset.

    Attributes:
        name: Registry name, e.g. ``'mnist'``.
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        class_names: Human-readable name of each label, in label order.
        shape: Shape of one image as (C, H, W).
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    shape: tuple[int, int, int]


@dataclass
class ArrayDataset:
    """A whole split held in memory as tensors.

    Attributes:
        images: uint8 [N, C, H, W], C-contiguous, raw pixel values 0..255.
        labels: int64 [N], values in ``0 .. info.num_classes - 1``.
        info: The dataset's metadata.
        split: ``'train'`` or ``'test'`` (or another name a custom source uses).
    """

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo
    split: str

    def __post_init__(self) -> None:
        what = f"{self.info.name}/{self.split}"
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or not self.images.is_contiguous():
            raise DataError(f"{what}: images must be a contiguous uint8 [N, C, H, W] tensor")
        if tuple(self.images.shape[1:]) != tuple(self.info.shape):
            raise DataError(
                f"{what}: images have shape {list(self.images.shape[1:])}, expected {list(self.info.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise DataError(f"{what}: labels must be an int64 [N] tensor with one label per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Returns ``(image uint8 [C, H, W], label)``; lets a DataLoader use the dataset directly."""
        return self.images[index], int(self.labels[index])


# (split, data_dir, download) -> (images uint8 [N, C, H, W], labels int64 [N]).
Loader = Callable[[str, Path | None, bool], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry: metadata plus the function that reads a split.

    Attributes:
        info: The dataset's metadata.
        load: Called as ``load(split, data_dir, download)``; returns images
            uint8 [N, C, H, W] and labels int64 [N] as numpy arrays.
        splits: The split names ``load`` accepts.
        same_as: Split -> the split it holds the same files as (e.g. a folder without ``test/`` has
            ``{"test": "val"}``), so that a run evaluates that data once.
    """

    info: DatasetInfo
    load: Loader
    splits: tuple[str, ...] = SPLITS
    same_as: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------- registry

_DATASETS: dict[str, DatasetSpec] = {}
_ALIASES: dict[str, str] = {}
_PREFIXES: dict[str, Callable[[str], DatasetSpec]] = {}


def register_dataset(name: str, info: DatasetInfo, aliases: Sequence[str] = ()) -> Callable[[Loader], Loader]:
    """Decorator that registers a loader under ``name`` (and optional aliases).

    Args:
        name: Canonical lower-case name; must equal ``info.name``.
        info: The dataset's metadata.
        aliases: Other accepted spellings, e.g. ``'cifar-10'``.

    Returns:
        A decorator that records the loader and returns it unchanged.
    """
    if name != info.name or name in _DATASETS or ":" in name:
        raise ValueError(f"bad or duplicate dataset registration {name!r}")

    def decorate(loader: Loader) -> Loader:
        _DATASETS[name] = DatasetSpec(info=info, load=loader)
        for alias in aliases:
            _ALIASES[alias.lower()] = name
        return loader

    return decorate


def register_dataset_prefix(prefix: str) -> Callable[[Callable[[str], DatasetSpec]], Callable[[str], DatasetSpec]]:
    """Decorator that handles every dataset name of the form ``'<prefix>:<argument>'``.

    The decorated resolver is called with the argument (the text after the
    first ``':'``) and returns the :class:`DatasetSpec` to use, e.g. a
    ``'folder'`` resolver that scans an image directory.

    Args:
        prefix: The part before ``':'``, e.g. ``'folder'``.

    Returns:
        A decorator that records the resolver and returns it unchanged.
    """
    if not prefix or ":" in prefix or prefix in _PREFIXES:
        raise ValueError(f"bad or duplicate dataset prefix {prefix!r}")

    def decorate(resolver: Callable[[str], DatasetSpec]) -> Callable[[str], DatasetSpec]:
        _PREFIXES[prefix] = resolver
        return resolver

    return decorate


def _resolve(name: str) -> DatasetSpec:
    """Returns the spec for a registered name, an alias, or a ``prefix:argument`` name."""
    name = name.strip()
    if ":" in name:
        prefix, argument = name.split(":", 1)
        resolver = _PREFIXES.get(prefix.lower())
        if resolver is None:
            known = ", ".join(f"{p}:" for p in sorted(_PREFIXES)) or "none"
            raise DataError(f"unknown dataset source '{prefix}:' in '{name}'; known prefixes: {known}")
        return resolver(argument)
    key = _ALIASES.get(name.lower(), name.lower())
    spec = _DATASETS.get(key)
    if spec is None:
        raise DataError(f"unknown dataset '{name}'; known datasets: {', '.join(list_datasets())}")
    return spec


def list_datasets() -> list[str]:
    """Returns the names of the registered datasets, sorted."""
    return sorted(_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """Returns the metadata of a dataset without reading its files.

    Args:
        name: A registered name (case-insensitive) or ``'prefix:argument'``.

    Raises:
        DataError: The name is unknown; the message lists the known names.
    """
    return _resolve(name).info


def validation_split(name: str) -> str | None:
    """The split that picks the model (best checkpoint, early stopping) when it is not the test split.

    Returns:
        ``"val"`` when the dataset has a val split holding other files than its test split, else None (then
        the test split also serves as validation, as for MNIST and CIFAR-10).
    """
    spec = _resolve(name)
    if "val" not in spec.splits or spec.same_as.get("test") == "val" or spec.same_as.get("val") == "test":
        return None
    return "val"


def load_dataset(
    name: str, split: str = "train", data_dir: PathLike | None = None, download: bool = True
) -> ArrayDataset:
    """Loads one split of a dataset fully into memory.

    Args:
        name: A registered name (see :func:`list_datasets`) or ``'prefix:argument'``.
        split: ``'train'`` or ``'test'``.
        data_dir: Searched first for the files and, when downloading, the
            first choice of where to put them.
        download: Download missing files (md5-verified) if they are found
            nowhere. With False, missing files are an error.

    Returns:
        The split as an :class:`ArrayDataset`.

    Raises:
        DataError: Unknown name or split, files missing (the one-line
            message says which files to put where), or corrupt files.
    """
    spec = _resolve(name)
    if split not in spec.splits:
        raise UnknownSplitError(f"unknown split '{split}' for {spec.info.name}; "
                                f"expected one of: {', '.join(spec.splits)}")
    root = Path(data_dir).expanduser() if data_dir is not None else None
    images, labels = spec.load(split, root, download)
    return ArrayDataset(images=_as_tensor(images), labels=_as_tensor(labels), info=spec.info, split=split)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """Wraps an array as a tensor, copying only if it is read-only or not C-contiguous."""
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, order="C")  # torch.from_numpy warns on read-only memory
    return torch.from_numpy(array)


# ----------------------------------------------------------------- where files are


def cache_dir() -> Path:
    """Returns the per-user cache root: ``$XDG_CACHE_HOME/cnnlab``, default ``~/.cache/cnnlab``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "cnnlab"


def _writable_roots(data_dir: Path | None) -> list[Path]:
    """Roots a download may go to, in order of preference: data_dir, $CNNLAB_DATA, the cache."""
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(data_dir)
    env = os.environ.get(DATA_ENV, "")
    if env:
        roots.append(Path(env).expanduser())
    roots.append(cache_dir())
    return _dedupe(roots)


def search_roots(data_dir: PathLike | None = None) -> list[Path]:
    """Returns the roots searched for dataset folders, in order.

    Args:
        data_dir: Optional root searched first.

    Returns:
        ``data_dir``, ``$CNNLAB_DATA``, the cache dir, then the system dirs.
    """
    first = Path(data_dir).expanduser() if data_dir is not None else None
    return _dedupe([*_writable_roots(first), *SYSTEM_DATA_DIRS])


def _dedupe(paths: Sequence[Path]) -> list[Path]:
    """Drops repeated paths, keeping the first occurrence."""
    return list(dict.fromkeys(paths))  # dicts keep insertion order


def _first_writable(roots: Sequence[Path]) -> Path | None:
    """Returns the first root that exists or can be created and is writable."""
    for root in roots:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(root, os.W_OK | os.X_OK):
            return root
    return None


def _missing_message(layout: _Layout, roots: Sequence[Path], reason: str, remedy: str) -> str:
    """Builds the one-line "not found: put these files there" error."""
    places = ", ".join(str(root / layout.folder) for root in roots)
    return (
        f"{layout.name} not found{reason}: put {', '.join(layout.all_files)} in one of: {places}"
        f" (or set {DATA_ENV} to a folder holding {layout.folder}/), or {remedy}"
    )


@dataclass(frozen=True)
class _Layout:
    """Where a dataset's files sit inside a root and how to fetch them.

    Attributes:
        name: Dataset name, for messages.
        folder: Sub-folder of a root, e.g. ``'mnist'``.
        split_files: Split -> the files (stems) that split needs.
        all_files: Every file, as named in messages (what a user should put there).
        remote: Name of the :mod:`cnnlab.data.download` attribute describing the
            mirrors; looked up at call time so tests can point it at a local server.
    """

    name: str
    folder: str
    split_files: dict[str, tuple[str, ...]]
    all_files: tuple[str, ...]
    remote: str


def _find(
    layout: _Layout, split: str, roots: Sequence[Path], candidates: Callable[[Path, str], list[Path]]
) -> list[Path] | None:
    """Returns the split's files from the first root holding all of them, else None."""
    for root in roots:
        folder = root / layout.folder
        found = [next((p for p in candidates(folder, stem) if p.is_file()), None) for stem in layout.split_files[split]]
        if all(p is not None for p in found):
            return [p for p in found if p is not None]
    return None


def _locate(
    layout: _Layout,
    split: str,
    data_dir: Path | None,
    download: bool,
    candidates: Callable[[Path, str], list[Path]],
    fetch: Callable[[Path], None],
) -> list[Path]:
    """Finds the split's files, downloading them with ``fetch(root)`` if allowed and needed."""
    roots = search_roots(data_dir)
    found = _find(layout, split, roots, candidates)
    if found is not None:
        return found
    online = "connect to the internet to download"
    if not download:
        raise DataError(_missing_message(layout, roots, " (downloading is off)", "allow downloading"))
    writable = _writable_roots(data_dir)
    existed = {root for root in writable if root.exists()}
    target = _first_writable(writable)
    if target is None:
        raise DataError(_missing_message(layout, roots, " and no writable folder to download into", online))
    log.info("downloading %s into %s", layout.name, target / layout.folder)
    created = [] if target in existed else [target]  # folders this download makes, deepest first
    if not (target / layout.folder).exists():
        created.insert(0, target / layout.folder)
    try:
        fetch(target)
    except DataError as exc:
        for d in created:  # leave no empty folders behind; a folder holding verified files stays
            try:
                d.rmdir()
            except OSError:
                break
        raise DataError(_missing_message(layout, roots, f" and download failed ({exc})", online)) from exc
    found = _find(layout, split, [target], candidates)
    if found is None:  # only if a download reported success yet left a file out
        raise DataError(_missing_message(layout, [target], " even after downloading", online))
    return found


# ----------------------------------------------------------------- IDX datasets

_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_candidates(folder: Path, stem: str) -> list[Path]:
    """Accepted names of one IDX file: as distributed (.gz), gunzipped, or with the
    dotted ``train-images.idx3-ubyte`` spelling some unpackers produce."""
    dotted = stem.replace("-idx", ".idx")
    return [folder / f"{stem}.gz", folder / stem, folder / f"{dotted}.gz", folder / dotted]


def _idx_layout(name: str, folder: str, remote: str) -> _Layout:
    """Layout of an MNIST-like dataset: four IDX files in one folder."""
    all_files = tuple(f"{stem}.gz" for split in SPLITS for stem in _IDX_STEMS[split])
    return _Layout(name=name, folder=folder, split_files=_IDX_STEMS, all_files=all_files, remote=remote)


def _fetch_idx(layout: _Layout, root: Path) -> None:
    """Downloads whichever of the four .gz files are not yet in ``root/<folder>``."""
    remote: dl.RemoteFiles = getattr(dl, layout.remote)
    folder = root / layout.folder
    for filename in layout.all_files:
        stem = filename.removesuffix(".gz")
        if any(p.is_file() for p in _idx_candidates(folder, stem)):
            continue
        dl.download_any(remote.urls(filename), folder / filename, remote.md5[filename])


def _load_idx(
    layout: _Layout, info: DatasetInfo, split: str, data_dir: Path | None, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Reads an MNIST-like split as images uint8 [N, 1, H, W] and labels int64 [N]."""
    images_path, labels_path = _locate(
        layout, split, data_dir, download, _idx_candidates, lambda root: _fetch_idx(layout, root)
    )
    images, labels = read_idx_pair(images_path, labels_path, num_classes=info.num_classes)
    if tuple(images.shape[1:]) != info.shape[1:]:
        expected = "x".join(map(str, info.shape[1:]))
        found = f"{images.shape[1]}x{images.shape[2]}"
        raise DataError(f"{images_path}: images are {found}, expected {expected} for {info.name}")
    return images[:, None], labels  # add the channel axis: [N, H, W] -> [N, 1, H, W]


MNIST_INFO = DatasetInfo(
    name="mnist",
    num_classes=10,
    class_names=tuple(str(d) for d in range(10)),
    shape=(1, 28, 28),
)

FASHION_MNIST_INFO = DatasetInfo(
    name="fashion-mnist",
    num_classes=10,
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    shape=(1, 28, 28),
)

_MNIST_LAYOUT = _idx_layout("mnist", "mnist", "MNIST_REMOTE")
_FASHION_LAYOUT = _idx_layout("fashion-mnist", "fashion-mnist", "FASHION_MNIST_REMOTE")


@register_dataset("mnist", MNIST_INFO)
def _load_mnist(split: str, data_dir: Path | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    return _load_idx(_MNIST_LAYOUT, MNIST_INFO, split, data_dir, download)


@register_dataset("fashion-mnist", FASHION_MNIST_INFO, aliases=("fashion_mnist", "fashionmnist"))
def _load_fashion_mnist(split: str, data_dir: Path | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    return _load_idx(_FASHION_LAYOUT, FASHION_MNIST_INFO, split, data_dir, download)


# --------------------------------------------------------------------- CIFAR-10

CIFAR10_INFO = DatasetInfo(
    name="cifar10",
    num_classes=10,
    class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    shape=(3, 32, 32),
)

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_META = "batches.meta"
_CIFAR_LAYOUT = _Layout(
    name="cifar10",
    folder=_CIFAR_FOLDER,
    split_files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    all_files=(*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", _CIFAR_META),
    remote="CIFAR10_REMOTE",
)


def _cifar_candidates(folder: Path, name: str) -> list[Path]:
    return [folder / name]


def _fetch_cifar(root: Path) -> None:
    """Downloads the CIFAR-10 archive into ``root``, extracts it there, then deletes it."""
    remote: dl.RemoteFiles = getattr(dl, _CIFAR_LAYOUT.remote)
    archive = root / dl.CIFAR10_ARCHIVE
    dl.download_any(remote.urls(dl.CIFAR10_ARCHIVE), archive, remote.md5[dl.CIFAR10_ARCHIVE])
    dl.extract_tar(archive, root, folder=_CIFAR_FOLDER)
    archive.unlink(missing_ok=True)  # 170 MB that is no longer needed


def _check_cifar_meta(folder: Path) -> None:
    """If ``batches.meta`` is present, checks it names the CIFAR-10 classes (not e.g. CIFAR-100's)."""
    meta = folder / _CIFAR_META
    if not meta.is_file():
        return
    names = tuple(read_cifar_meta(meta))
    if names != CIFAR10_INFO.class_names:
        raise DataError(f"{meta}: label names {list(names)} are not CIFAR-10's {list(CIFAR10_INFO.class_names)}")


@register_dataset("cifar10", CIFAR10_INFO, aliases=("cifar-10", "cifar_10"))
def _load_cifar10(split: str, data_dir: Path | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """Reads a CIFAR-10 split as images uint8 [N, 3, 32, 32] and labels int64 [N]."""
    paths = _locate(_CIFAR_LAYOUT, split, data_dir, download, _cifar_candidates, _fetch_cifar)
    _check_cifar_meta(paths[0].parent)
    batches = [read_cifar_batch(p) for p in paths]
    # HWC views of the stored planes transpose back to contiguous NCHW without a copy.
    images = [hwc.transpose(0, 3, 1, 2) for hwc, _ in batches]
    labels = [lab for _, lab in batches]
    if len(batches) == 1:
        return images[0], labels[0]
    return np.concatenate(images), np.concatenate(labels)
