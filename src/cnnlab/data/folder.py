"""Image-folder datasets: ``--dataset 'folder:PATH[?size=224&val=0.2&channels=3&resize=shorter-crop&seed=0]'``.

Layout (class names are the sub-folder names, sorted; label i is the i-th name)::

    PATH/train/<class>/*.png|jpg|...     the training split
    PATH/val/<class>/...                 optional: the validation split (model selection)
    PATH/test/<class>/...                optional: the test split (evaluated once, at the end)

or simply ``PATH/<class>/*`` when there is no ``train/`` folder. Files are looked for recursively inside
each class folder; hidden files and files that are not images by extension are skipped.

Splits ``train``, ``val`` and ``test``:

* ``val`` is ``val/`` when present; else a stratified, deterministic fraction ``val=F`` of each class held out
  of ``train`` (default 0.2; with a ``test/`` folder and no ``val=``, nothing is held out and ``val`` is the
  test split).
* ``test`` is ``test/`` when present, else the same files as ``val`` (then there is no separate test set).
* Loading an empty split (e.g. ``val=0`` without a ``test/`` folder) is an error, never a NaN accuracy.

Options after ``?`` (joined by ``&``):

* ``size=N`` or ``size=HxW``: the size images are brought to; default 224 (``DEFAULT_SIZE``). It is never read
  from the images: pass the model's input size, e.g. ``size=28`` for the MNIST models (`sized_for_model` adds
  it to a name that has none; training on random-resized crops adds a larger one, `decode_size`).
* ``resize=shorter-crop|stretch``: scale the shorter side to ``size`` and keep the centre (default, as
  torchvision and Keras' ``crop_to_aspect_ratio`` do), or stretch the whole picture to ``size``.
* ``channels=1|3``: grayscale or RGB. Default: 1 if every image is grayscale, else 3. Transparent pixels
  become white; 16-bit and float images are scaled to 8 bits; EXIF orientation is applied.
* ``val=F``: the held-out fraction above. ``seed=N``: seed of the held-out draw (default 0).
* ``workers=N``: decoding processes or threads (default: the usable CPUs, at most 8). ``decode=processes|threads``:
  which (default ``auto``: forked processes from ``PROCESS_MIN_FILES`` files on Linux, else threads).
  ``cache=0``: decode into memory instead of the on-disk cache.

Each split is decoded once, in parallel (JPEGs by libjpeg-turbo near the target size, as PIL's ``draft``), into
a uint8 [N, C, H, W] ``.npy`` under the cache folder (`cnnlab.data.cache`) that every later command maps instead
of decoding again.
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..errors import DataError
from ..preprocess import Preprocess
from ..runtime import available_cpus
from .cache import cache_key, cached_array, cached_json
from .images import MAX_PIXELS, RESIZES, decoder_versions, image_to_array, open_image
from .sources import DatasetInfo, DatasetSpec, register_dataset_prefix

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
DEFAULT_VAL = 0.2
DEFAULT_SIZE = (224, 224)  # the common ImageNet-model input; the images' own sizes are never used
SPLITS = ("train", "val", "test")
# Training on random-resized crops, a model's input is this fraction of the decoded side (224 of 256, as
# torchvision's and timm's ImageNet recipes): crops keep their resolution, evaluation takes the centre crop.
CROP_FRACTION = 0.875
DECODES = ("auto", "threads", "processes")
# decode=auto forks from this many files: a child costs 5-20 ms to start (most of it copying the page tables
# of a process that has torch loaded), as much as decoding 20-60 small JPEGs, so a second core pays off only
# over a few hundred of them.
PROCESS_MIN_FILES = 256


@dataclass(frozen=True)
class FolderOptions:
    """What a ``folder:`` dataset name says.

    Attributes:
        path: The dataset root.
        val: Fraction of each class held out as the val split (None: the default rule).
        size: (H, W) every image is brought to (None: ``DEFAULT_SIZE``).
        channels: 1 or 3 (None: 1 if every image is grayscale, else 3).
        seed: Seed of the held-out draw.
        resize: 'shorter-crop' or 'stretch'.
        workers: Decoding threads or processes (None: the usable CPUs, at most 8).
        cache: Keep decoded splits on disk (else decode into memory each time).
        decode: 'auto', 'threads' or 'processes' (`uses_processes`).
    """

    path: Path
    val: float | None = None
    size: tuple[int, int] | None = None
    channels: int | None = None
    seed: int = 0
    resize: str = "shorter-crop"
    workers: int | None = None
    cache: bool = True
    decode: str = "auto"


def _positive_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    size = (int(h), int(w or h))
    if min(size) < 1 or size[0] * size[1] > MAX_PIXELS:
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


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    """A parser accepting exactly the texts in ``choices``."""
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError
        return text
    return parse


def _workers(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 256:
        raise ValueError
    return n


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError
    return text == "1"


# Option name -> (field, parser, what a good value looks like).
_OPTIONS = {
    "val": ("val", _fraction, "a fraction in [0, 1), e.g. val=0.2"),
    "size": ("size", _positive_size, f"N or HxW with at most {MAX_PIXELS:,} pixels, e.g. size=224"),
    "channels": ("channels", _channels, "1 or 3"),
    "seed": ("seed", int, "an integer"),
    "resize": ("resize", _one_of(RESIZES), " or ".join(RESIZES)),
    "workers": ("workers", _workers, "an integer from 1 to 256"),
    "cache": ("cache", _flag, "0 or 1"),
    "decode": ("decode", _one_of(DECODES), " or ".join(DECODES)),
}


def parse_folder_name(argument: str) -> FolderOptions:
    """``'PATH?val=0.2&size=64'`` (the text after ``folder:``) -> `FolderOptions`; bad options raise DataError."""
    path, _, query = argument.strip().partition("?")
    if not path:
        raise DataError("folder dataset needs a path: folder:PATH[?size=224&val=0.2&channels=3]")
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


def sized_for_model(name: str, input_size: tuple[int, int]) -> str:
    """``name`` with ``size=HxW`` added when it is a ``folder:`` name without one; other names unchanged.

    For code that builds the model before loading the data: the folder is then decoded at the model's input
    size instead of ``DEFAULT_SIZE``.
    """
    if not name.strip().lower().startswith("folder:"):
        return name
    path, _, query = name.partition("?")
    if any(item.partition("=")[0] == "size" for item in query.split("&")):
        return name
    return f"{path}?{query + '&' if query else ''}size={input_size[0]}x{input_size[1]}"


def absolute_folder(name: str) -> str:
    """``name`` with a ``folder:`` dataset's path made absolute (``~`` expanded, resolved from the current
    folder); other names unchanged.

    A run records its dataset by name, so a relative path would only find the images again from the folder the
    run was trained in; evaluate, predict and report may run from anywhere.
    """
    if not name.strip().lower().startswith("folder:"):
        return name
    prefix, _, rest = name.strip().partition(":")
    path, sep, query = rest.partition("?")
    if not path:  # no path: `parse_folder_name` says what is missing
        return name
    return f"{prefix}:{Path(path).expanduser().resolve()}{sep}{query}"


def decode_size(input_size: tuple[int, int], resized_crop: bool) -> tuple[int, int]:
    """The (H, W) a folder is decoded at when its name gives no ``size=``, for a model taking ``input_size``.

    The model's own size, or with ``resized_crop`` (the run trains on random-resized crops) ``input_size /
    CROP_FRACTION`` rounded down, e.g. 256 for 224: a crop of part of the picture then still has about as many
    pixels as the model's input instead of being upscaled from fewer, and evaluation and prediction use the
    centre ``input_size`` crop of the larger image (the run records it, `cnnlab.preprocess.for_training`).
    """
    if not resized_crop:
        return tuple(input_size)
    return tuple(max(s, math.floor(s / CROP_FRACTION)) for s in input_size)


def _images_in(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted by path parts), skipping hidden files and folders, other
    extensions and symlinked folders (as ``Path.rglob``).

    `os.scandir` reads each entry's type from the directory listing, so a folder of N files costs one listing,
    not N ``stat`` calls and N ``Path`` objects; every command scans before it can map the decoded cache.
    """
    found: list[tuple[list[str], str]] = []

    def walk(directory: str, parts: list[str]) -> None:
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except PermissionError:
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                walk(e.path, [*parts, e.name])
            elif os.path.splitext(e.name)[1].lower() in EXTENSIONS and e.is_file():
                found.append(([*parts, e.name], e.path))

    walk(os.fspath(folder), [])
    found.sort(key=lambda f: f[0])
    return [Path(path) for _, path in found]


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


Files = list[tuple[Path, int]]


@dataclass(frozen=True)
class FolderScan:
    """The files of each split with their labels, and how every image is decoded.

    Attributes:
        empty_reason: Split -> why it has no files (only for empty splits), for the error on loading it.
    """

    classes: tuple[str, ...]
    splits: dict[str, Files]
    shape: tuple[int, int, int]
    resize: str
    empty_reason: dict[str, str]


def _held_out(files: Files, frac: float, seed: int, num_classes: int) -> tuple[Files, Files]:
    """Split (file, label) pairs per class: round(frac * n) of each class (at least 1, at most n - 1 when
    frac > 0 and n >= 2) go to the held-out split, drawn with a generator seeded by (seed, class)."""
    train, held = [], []
    for label in range(num_classes):
        group = [f for f in files if f[1] == label]
        k = min(max(round(frac * len(group)), 1 if frac > 0 else 0), max(len(group) - 1, 0))
        chosen = set(np.random.default_rng([seed, label]).permutation(len(group))[:k].tolist())
        for i, f in enumerate(group):
            (held if i in chosen else train).append(f)
    return train, held


def _header_mode(path: Path) -> str:
    """The image mode read from the file header only; unreadable files raise DataError naming them."""
    try:
        with Image.open(path) as im:
            return im.mode
    except Image.DecompressionBombError:
        raise DataError(f"{path}: image too large (at most {MAX_PIXELS:,} pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {str(e)[:100]})") from None


def _labelled_split(split_dir: Path, classes: tuple[str, ...], train_dir: Path) -> Files:
    """(file, label) pairs of a val/ or test/ folder whose class folders must be among ``classes``."""
    unknown = sorted({d.name for d in _class_dirs(split_dir)} - set(classes))
    if unknown:
        raise DataError(f"{split_dir}: class folder(s) {', '.join(unknown)} not in {train_dir} ({', '.join(classes)})")
    files = [(p, classes.index(d.name)) for d in _class_dirs(split_dir) for p in _images_in(d)]
    if not files:
        raise DataError(f"{split_dir}: no images in its class folders")
    return files


def _workers_for(opts: FolderOptions) -> int:
    return opts.workers or min(8, available_cpus())


def scan_folder(opts: FolderOptions) -> FolderScan:
    """Find classes and files, decide the splits, channels and size. Reads headers (once; cached), not pixels."""
    root = opts.path
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (expected {root}/train/<class>/*.png|jpg, or "
                        f"{root}/<class>/*.png|jpg)")
    nested = (root / "train").is_dir()
    train_dir = root / "train" if nested else root
    val_dir, test_dir = ((root / n if nested and (root / n).is_dir() else None) for n in ("val", "test"))
    classes = tuple(d.name for d in _class_dirs(train_dir))
    if not classes:
        raise DataError(f"{train_dir}: no class folders (expected {train_dir}/<class>/*.png|jpg)")
    train: Files = []
    for label, name in enumerate(classes):
        found = _images_in(train_dir / name)
        if not found:
            raise DataError(f"{train_dir / name}: no images ({', '.join(EXTENSIONS)}) in class folder {name!r}")
        train += [(p, label) for p in found]
    if len(classes) == 1:  # a one-class classifier is right every time and learns nothing
        raise DataError(f"{train_dir}: only one class folder ({classes[0]!r}); need at least 2 classes "
                        f"(one folder of images per class: {train_dir}/<class>/*.png|jpg)")
    test = _labelled_split(test_dir, classes, train_dir) if test_dir else None
    reason = {}
    if val_dir is not None:
        if opts.val is not None:
            raise DataError(f"{root} has a val/ folder; drop val={opts.val} (it is the validation split)")
        val = _labelled_split(val_dir, classes, train_dir)
    elif opts.val is not None or test is None:
        frac = DEFAULT_VAL if opts.val is None else opts.val
        train, val = _held_out(train, frac, opts.seed, len(classes))
        reason["val"] = f"val={frac} holds out no image and there is no {root}/val/ folder"
    else:
        val = test
    if test is None:
        test = val
        reason["test"] = reason.get("val", "") + f"; with no {root}/test/ folder, test is the val split"
    channels = opts.channels or _default_channels([p for p, _ in train + val + test], opts)
    size = opts.size or DEFAULT_SIZE
    return FolderScan(classes=classes, splits={"train": train, "val": val, "test": test},
                      shape=(channels, *size), resize=opts.resize,
                      empty_reason={k: v for k, v in reason.items() if v})


def _default_channels(files: list[Path], opts: FolderOptions) -> int:
    """1 when every file's header says grayscale, else 3; remembered per file list (headers cost a file open)."""
    unique = sorted(set(files))
    key = cache_key(unique, {"what": "grayscale"})
    if not opts.cache:
        return _all_gray(unique, opts)
    return 1 if cached_json(key, lambda: _all_gray(unique, opts) == 1) else 3


def _all_gray(files: list[Path], opts: FolderOptions) -> int:
    """1 if every header says grayscale, else 3, reading headers in runs that grow from one file.

    A colour folder usually says so in its first header, so it is not read whole before decoding (a header
    read is mostly Python: threads barely help). A broken file left unread here is named when it is decoded.
    """
    with ThreadPoolExecutor(_workers_for(opts)) as pool:
        start, run = 0, 1
        while start < len(files):
            if any(m not in GRAY_MODES for m in pool.map(_header_mode, files[start:start + run])):
                return 3
            start, run = start + run, min(run * 8, 4096)
    return 1


def decode_file(path: Path, shape: tuple[int, int, int], resize: str, out: np.ndarray | None = None) -> np.ndarray:
    """One file as uint8 [C, H, W] (into ``out`` when given), exactly as ``predict`` reads it: `open_image`, then
    `image_to_array` (the core of `image_to_tensor`)."""
    im = open_image(path, size=shape[1:], resize=resize)
    try:
        return image_to_array(im, shape[0], shape[1:], resize, out=out)
    finally:
        im.close()  # frees the decoded bitmap now rather than at the next garbage collection


def _chunk_size(n: int, workers: int) -> int:
    """Files a thread takes at a time: enough that taking one is rare, few enough that threads finish together."""
    return max(1, min(32, n // (workers * 4)))


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0  # decoding it reports the problem


def _runs(files: list[Path], workers: int) -> list[range]:
    """The threads' tasks: files far larger than the typical one first, each alone, then runs of consecutive files.

    Longest first: one 12-megapixel photo costs as much as a hundred small images, and a thread that met a few of
    them among the last tasks left the other threads idle (with four phone photos among 2,000 small JPEGs, the
    second thread added 10-40% instead of up to 2x, depending on where the photos fell).
    """
    n = len(files)
    chunk = _chunk_size(n, workers)
    if workers < 2 or n < 2:
        return [range(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    sizes = [_file_size(f) for f in files]
    big_from = 8 * sorted(sizes)[n // 2]
    big = sorted((i for i in range(n) if sizes[i] > big_from), key=lambda i: -sizes[i])
    rest = [i for i in range(n) if sizes[i] <= big_from]
    runs: list[range] = [range(i, i + 1) for i in big]
    k = 0
    while k < len(rest):  # consecutive indices among the rest, at most `chunk` at a time
        j = k + 1
        while j < len(rest) and j - k < chunk and rest[j] == rest[j - 1] + 1:
            j += 1
        runs.append(range(rest[k], rest[j - 1] + 1))
        k = j
    return runs


def _decode_runs(files: list[Path], runs: list[range], shape: tuple[int, int, int], resize: str,
                 write_row: Callable[[int, np.ndarray], None], take: Callable[[], int | None],
                 finished: Callable[[int], None]) -> None:
    """Decode the runs ``take()`` hands out (None: stop) into ``write_row``; ``finished(k)`` after run k."""
    row = np.empty(shape, dtype=np.uint8)
    while (k := take()) is not None:
        for i in runs[k]:
            write_row(i, decode_file(files[i], shape, resize, out=row))
        finished(k)


def _decode_threads(files: list[Path], runs: list[range], shape: tuple[int, int, int], resize: str, workers: int,
                    write_row: Callable[[int, np.ndarray], None], bar: tqdm) -> None:
    """`_decode_all` on ``workers`` threads of this process (the calling one included)."""
    tasks = iter(range(len(runs)))
    lock = threading.Lock()
    failed: list[BaseException] = []

    def take() -> int | None:
        with lock:
            return None if failed else next(tasks, None)

    def finished(k: int) -> None:
        with lock:
            bar.update(len(runs[k]))

    def work() -> None:
        try:
            _decode_runs(files, runs, shape, resize, write_row, take, finished)
        except BaseException as e:  # re-raised by the caller's thread; the other threads stop at their next run
            failed.append(e)

    threads = [threading.Thread(target=work, name=f"decode-{k}", daemon=True)
               for k in range(1, min(workers, len(runs)))]
    try:
        for t in threads:
            t.start()
        work()  # the calling thread decodes too
        for t in threads:
            t.join()
    except BaseException as e:  # e.g. Ctrl-C while joining: the threads stop before the caller closes the file
        failed.append(e)
        for t in threads:
            t.join()
        raise
    if failed:
        raise failed[0]


def forks() -> bool:
    """Whether decoding may use forked processes: on Linux only (macOS' system libraries are not fork-safe), and not
    inside a daemonic process (a multiprocessing pool's worker), which may not start children."""
    return (sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
            and not multiprocessing.current_process().daemon)


def _sendable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (to cross from a decoding process to the caller), else a short stand-in."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any exception type may refuse pickling
        return DataError(f"decoding failed ({type(e).__name__}: {str(e)[:200]})")


def _decode_processes(files: list[Path], runs: list[range], shape: tuple[int, int, int], resize: str,
                      workers: int, write_row: Callable[[int, np.ndarray], None], bar: tqdm) -> None:
    """`_decode_all` on this process and ``workers - 1`` forked copies of it.

    Why processes: with threads, about a third of each small image's work (reading the file, wrapping the pixels
    for PIL's resize, the copy into the row) holds the GIL, so a second thread added only 1.1-1.3x; a second
    process adds what a second core has. Why fork rather than a pool of fresh interpreters: a child is ready in
    milliseconds with every module already imported, while a fresh one must import numpy, PIL and this package
    (and with it torch) before its first file, longer than decoding a few thousand small images takes. The
    children run no torch code and start no threads, which is what makes forking a process that has torch's
    thread pool safe (as torch's own DataLoader workers do).

    Rows cross without copies: ``write_row`` writes into the cache file (``pwrite`` on an inherited descriptor)
    or into memory shared with the children (`_shared_empty`). Only run numbers, counts and errors go through
    shared memory and a pipe. A child that dies (killed, out of memory) leaves its run unmarked; this process
    decodes such runs itself at the end.
    """
    ctx = multiprocessing.get_context("fork")
    state = ctx.Array("q", 3)  # [next run to hand out, images done, 1 once any process failed]
    done = ctx.RawArray("b", len(runs))  # done[k]: every row of run k is written
    errors = ctx.SimpleQueue()

    def take() -> int | None:
        with state.get_lock():
            k = state[0]
            if state[2] or k >= len(runs):
                return None
            state[0] = k + 1
            return k

    def finished(k: int) -> None:
        done[k] = 1
        with state.get_lock():
            state[1] += len(runs[k])

    def child() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the caller stops the children
        try:
            _decode_runs(files, runs, shape, resize, write_row, take, finished)
        except BaseException as e:  # the caller raises it; the others stop at their next run
            with state.get_lock():
                state[2] = 1
            errors.put(_sendable(e))

    def in_caller(k: int) -> None:
        finished(k)
        bar.update(state[1] - bar.n)

    sys.stdout.flush()  # a child flushes its copy of any unwritten output as it exits: write it once, now
    sys.stderr.flush()
    procs = []
    try:
        with warnings.catch_warnings():  # Python >= 3.12 warns of forking with threads; see the docstring
            warnings.simplefilter("ignore", DeprecationWarning)
            for k in range(1, min(workers, len(runs))):
                p = ctx.Process(target=child, name=f"decode-{k}", daemon=True)
                try:
                    p.start()
                except OSError:  # no memory or process slot for a fork: fewer workers (at worst this process alone)
                    break
                procs.append(p)
        try:
            _decode_runs(files, runs, shape, resize, write_row, take, in_caller)
        except BaseException:
            with state.get_lock():
                state[2] = 1
            raise
        for p in procs:
            while p.is_alive():
                p.join(0.1)
                bar.update(state[1] - bar.n)
    except BaseException:  # an error here, or Ctrl-C: the children's rows are not wanted any more
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
        raise
    if not errors.empty():
        raise errors.get()
    lost = [k for k in range(len(runs)) if not done[k]]  # a child's run when it died
    if lost:
        left = iter(lost)
        _decode_runs(files, runs, shape, resize, write_row, lambda: next(left, None), in_caller)


def _decode_all(files: list[Path], shape: tuple[int, int, int], resize: str, workers: int,
                write_row: Callable[[int, np.ndarray], None], what: str, processes: bool = False) -> None:
    """Decode ``files`` into rows ``write_row(i, image)`` with ``workers`` threads or processes (``processes``:
    ``write_row`` must write where forked children's writes are seen); the first error stops the rest.

    The work is handed out as runs of consecutive files (`_runs`: the largest files first), each decoded into
    the worker's own row buffer; no future or queue per image. With threads, PIL and libjpeg-turbo release the
    GIL while they decode and resize, so the Python work per image (opening, a few attribute reads, one copy
    into the buffer) is what threads contend for, and it is kept small.
    """
    runs = _runs(files, workers)
    bar = tqdm(total=len(files), unit="img", desc=f"decoding {what}", leave=False, dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    try:
        if processes and len(runs) > 1:  # (`uses_processes` has checked the workers and the platform)
            _decode_processes(files, runs, shape, resize, workers, write_row, bar)
        else:
            _decode_threads(files, runs, shape, resize, workers, write_row, bar)
    finally:
        bar.close()


def _shared_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised-looking uint8 array (zero pages) in memory shared with forked children: what they write
    into it, this process sees."""
    nbytes = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=np.uint8, count=nbytes).reshape(shape)


def uses_processes(decode: str, n: int, workers: int) -> bool:
    """Whether ``n`` files decode in processes: ``decode`` 'processes', or 'auto' from `PROCESS_MIN_FILES`."""
    if decode == "threads" or workers < 2 or not forks():
        return False
    return decode == "processes" or n >= PROCESS_MIN_FILES


def read_images(files: Files, shape: tuple[int, int, int], resize: str = "shorter-crop", *,
                workers: int = 1, cache: bool = True, what: str = "images",
                decode: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Decode (file, label) pairs into images uint8 [N, C, H, W] and labels int64 [N].

    With ``cache`` the images come memory-mapped from the on-disk cache (decoded into it on a miss).
    ``decode`` ('auto' | 'threads' | 'processes') picks how ``workers`` decode in parallel (`uses_processes`).
    """
    labels = np.array([label for _, label in files], dtype=np.int64)
    paths = [p for p, _ in files]
    full = (len(files), *shape)
    processes = uses_processes(decode, len(files), workers)
    if not cache or not files:
        images = _shared_empty(full) if processes else np.empty(full, dtype=np.uint8)
        _decode_all(paths, shape, resize, workers, images.__setitem__, what, processes)
        return images, labels
    options = {"shape": list(shape), "resize": resize, "interpolation": "bilinear", **decoder_versions()}
    key = cache_key(paths, options)
    images = cached_array(key, full, lambda write: _decode_all(paths, shape, resize, workers, write, what,
                                                                processes))
    if images is None:  # no usable cache folder: decode into memory, as with cache=0
        return read_images(files, shape, resize, workers=workers, cache=False, what=what, decode=decode)
    return images, labels


@dataclass(frozen=True)
class FolderInfo(DatasetInfo):
    """A folder's `DatasetInfo` plus how its files were prepared (``preprocess``: size, channels, polarity,
    resize, interpolation), which a run records so that predicting a file prepares it the same way."""

    preprocess: Preprocess | None = None


def _preprocess_record(shape: tuple[int, int, int], resize: str) -> Preprocess:
    """The `cnnlab.preprocess.Preprocess` of a folder: its size, channels and resize, never inverted."""
    return Preprocess(size=tuple(shape[1:]), channels=shape[0], invert="no", resize=resize,
                      interpolation="bilinear")


@register_dataset_prefix("folder")
def resolve_folder(argument: str) -> DatasetSpec:
    """The `DatasetSpec` of ``folder:<argument>`` (see the module docstring for the syntax)."""
    opts = parse_folder_name(argument)
    scan = scan_folder(opts)
    info = FolderInfo(name=f"folder:{argument}", num_classes=len(scan.classes), class_names=scan.classes,
                      shape=scan.shape,
                      preprocess=_preprocess_record(scan.shape, scan.resize))

    def load(split: str, data_dir, download: bool) -> tuple[np.ndarray, np.ndarray]:
        files = scan.splits[split]
        if not files:
            raise DataError(f"folder:{argument}: the {split} split is empty ({scan.empty_reason.get(split, '')}); "
                            f"use val>0 or add {opts.path}/{split}/<class>/ folders")
        return read_images(files, scan.shape, scan.resize, workers=_workers_for(opts), cache=opts.cache,
                           what=f"{opts.path.name}/{split}", decode=opts.decode)

    same = {"test": "val"} if scan.splits["test"] is scan.splits["val"] else {}
    return DatasetSpec(info=info, load=load, splits=SPLITS, same_as=same)
