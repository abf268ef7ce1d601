"""Image-folder datasets: ``--dataset 'folder:PATH[?val=0.2&size=64&channels=3&seed=0]'``.

Layout (class names are the sub-folder names, sorted; label i is the i-th name)::

    PATH/train/<class>/*.png|jpg|...     the training split
    PATH/test/<class>/...  or  PATH/val/<class>/...   the held-out split (test/ wins if both exist)

or simply ``PATH/<class>/*`` when there is no ``train/`` folder. Files are looked for recursively inside
each class folder; hidden files and files that are not images by extension are skipped.

Options after ``?`` (joined by ``&``):

* ``val=F``: hold out a fraction F of each class as the ``test`` split (stratified, deterministic: the
  same files for the same folder and ``seed``). Default 0.2 when the folder has no ``test/`` or ``val/``;
  not allowed when it has one. ``val=0`` gives an empty test split.
* ``size=N`` or ``size=HxW``: every image is resized (stretched) to this size. Default: the size of the
  first training image (in sorted order). Pick the model's input size, e.g. ``size=28`` for the MNIST
  models; images of another size than the model's are centre-cropped / padded when fed to it.
* ``channels=1|3``: grayscale or RGB. Default: 1 if every image is grayscale, else 3. Transparent pixels
  become white; 16-bit and float images are scaled to 8 bits.
* ``seed=N``: seed of the held-out draw (default 0).

The whole split is decoded into one uint8 tensor [N, C, H, W].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .images import image_to_tensor, open_image
from .sources import DatasetInfo, DatasetSpec, register_dataset_prefix

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
DEFAULT_VAL = 0.2


@dataclass(frozen=True)
class FolderOptions:
    """What a ``folder:`` dataset name says.

    Attributes:
        path: The dataset root.
        val: Fraction of each class held out as the test split (None: the default rule).
        size: (H, W) every image is resized to (None: the first training image's size).
        channels: 1 or 3 (None: 1 if every image is grayscale, else 3).
        seed: Seed of the held-out draw.
    """

    path: Path
    val: float | None = None
    size: tuple[int, int] | None = None
    channels: int | None = None
    seed: int = 0


def _positive_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    size = (int(h), int(w or h))
    if min(size) < 1:
        raise ValueError
    return size


def _fraction(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise ValueError
    return v


def _channels(text: str) -> int:
    if text not in ("1", "3"):
        raise ValueError
    return int(text)


# Option name -> (field, parser, what a good value looks like).
_OPTIONS = {
    "val": ("val", _fraction, "a fraction in [0, 1), e.g. val=0.2"),
    "size": ("size", _positive_size, "N or HxW, e.g. size=64"),
    "channels": ("channels", _channels, "1 or 3"),
    "seed": ("seed", int, "an integer"),
}


def parse_folder_name(argument: str) -> FolderOptions:
    """``'PATH?val=0.2&size=64'`` (the text after ``folder:``) -> `FolderOptions`; bad options raise DataError."""
    path, _, query = argument.strip().partition("?")
    if not path:
        raise DataError("folder dataset needs a path: folder:PATH[?val=0.2&size=64&channels=3]")
    values: dict = {}
    for item in filter(None, query.split("&")):
        key, _, text = item.partition("=")
        if key not in _OPTIONS:
            raise DataError(f"folder:{argument}: unknown option {key!r}; known: {', '.join(_OPTIONS)}")
        field, parse, hint = _OPTIONS[key]
        try:
            values[field] = parse(text.strip())
        except ValueError:
            raise DataError(f"folder:{argument}: bad {key}={text!r}; expected {hint}") from None
    return FolderOptions(path=Path(path).expanduser(), **values)


def _images_in(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), skipping hidden files and other extensions."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass(frozen=True)
class FolderScan:
    """The files of each split with their labels, and the shape every image is brought to."""

    classes: tuple[str, ...]
    splits: dict[str, list[tuple[Path, int]]]
    shape: tuple[int, int, int]


def _held_out(files: list[tuple[Path, int]], frac: float, seed: int, num_classes: int):
    """Split (file, label) pairs per class: round(frac * n) of each class (at least 1, at most n - 1 when
    frac > 0 and n >= 2) go to the test split, drawn with a generator seeded by (seed, class)."""
    train, test = [], []
    for label in range(num_classes):
        group = [f for f in files if f[1] == label]
        k = min(max(round(frac * len(group)), 1 if frac > 0 else 0), max(len(group) - 1, 0))
        chosen = set(np.random.default_rng([seed, label]).permutation(len(group))[:k].tolist())
        for i, f in enumerate(group):
            (test if i in chosen else train).append(f)
    return train, test


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    """(mode, (H, W)) read from the file header only; unreadable files raise DataError naming them."""
    try:
        with Image.open(path) as im:
            return im.mode, (im.height, im.width)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {str(e)[:100]})") from None


def scan_folder(opts: FolderOptions) -> FolderScan:
    """Find classes and files, decide the held-out split, channels and size. Reads headers, not pixels."""
    root = opts.path
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (expected {root}/train/<class>/*.png|jpg)")
    train_dir = root / "train" if (root / "train").is_dir() else root
    test_dir = next((root / n for n in ("test", "val") if train_dir != root and (root / n).is_dir()), None)
    classes = tuple(d.name for d in _class_dirs(train_dir))
    if not classes:
        raise DataError(f"{train_dir}: no class folders (expected {train_dir}/<class>/*.png|jpg)")
    train = []
    for label, name in enumerate(classes):
        found = _images_in(train_dir / name)
        if not found:
            raise DataError(f"{train_dir / name}: no images ({', '.join(EXTENSIONS)}) in class folder {name!r}")
        train += [(p, label) for p in found]
    if test_dir is not None:
        if opts.val is not None:
            raise DataError(f"{root} has a {test_dir.name}/ folder; drop val={opts.val} (it is the held-out split)")
        unknown = sorted(set(d.name for d in _class_dirs(test_dir)) - set(classes))
        if unknown:
            raise DataError(f"{test_dir}: class folder(s) {', '.join(unknown)} not in {train_dir} "
                            f"({', '.join(classes)})")
        test = [(p, classes.index(d.name)) for d in _class_dirs(test_dir) for p in _images_in(d)]
        if not test:
            raise DataError(f"{test_dir}: no images in its class folders")
    else:
        train, test = _held_out(train, DEFAULT_VAL if opts.val is None else opts.val, opts.seed, len(classes))
    headers = {p: _header(p) for p, _ in train + test}
    channels = opts.channels or (1 if all(m in GRAY_MODES for m, _ in headers.values()) else 3)
    size = opts.size or headers[train[0][0]][1]
    return FolderScan(classes=classes, splits={"train": train, "test": test}, shape=(channels, *size))


def _eight_bit(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit 'L' by scaling (PIL's own conversion clips at 255)."""
    if im.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return im
    a = np.asarray(im, dtype=np.float64)
    top = 1.0 if im.mode == "F" and a.max(initial=0) <= 1.0 else (255.0 if a.max(initial=0) <= 255 else 65535.0)
    return Image.fromarray(np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8), "L")


def read_images(files: list[tuple[Path, int]], shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Decode (file, label) pairs into images uint8 [N, C, H, W] and labels int64 [N]."""
    images = np.empty((len(files), *shape), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        images[i] = image_to_tensor(_eight_bit(open_image(path)), shape[0], shape[1:], invert="no").numpy()
    return images, np.array([label for _, label in files], dtype=np.int64)


@register_dataset_prefix("folder")
def resolve_folder(argument: str) -> DatasetSpec:
    """The `DatasetSpec` of ``folder:<argument>`` (see the module docstring for the syntax)."""
    scan = scan_folder(parse_folder_name(argument))
    info = DatasetInfo(name=f"folder:{argument}", num_classes=len(scan.classes), class_names=scan.classes,
                       shape=scan.shape)

    def load(split: str, data_dir, download: bool) -> tuple[np.ndarray, np.ndarray]:
        return read_images(scan.splits[split], scan.shape)

    return DatasetSpec(info=info, load=load, splits=("train", "test"))
