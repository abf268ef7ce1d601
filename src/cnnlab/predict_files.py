"""``cnnlab predict RUN DIR``: every image under a folder, in batches, one output line per file.

Directories are walked recursively (image extensions only, hidden entries skipped, sorted); files are
predicted in batches through the run's own preparation (whatever ``predict_batch`` does with paths); a file
that cannot be read is reported on stderr and skipped instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from . import io, rundir
from .data.folder import EXTENSIONS
from .errors import CnnlabError, DataError
from .labels import printable  # names from a checkpoint must not break or reorder lines

FORMATS = ("text", "csv", "jsonl", "json")


def image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, and the image files under each directory (recursive, sorted, hidden ones skipped)."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            out += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                          and not any(part.startswith(".") for part in p.relative_to(item).parts))
        else:
            out.append(item)
    if not out:
        raise DataError(f"no image files ({', '.join(EXTENSIONS)}) in {', '.join(map(str, inputs))}")
    return out


def predict_stream(predict_batch: Callable[[list[Path]], list[dict]], files: list[Path], batch_size: int,
                   progress: bool | None = None) -> Iterator[tuple[Path, dict | None, str | None]]:
    """(file, prediction, None) or (file, None, why it was skipped) for each file, in order.

    A batch that fails is retried file by file, so one unreadable file costs only itself.
    """
    bar = tqdm(total=len(files), unit="img", leave=False, dynamic_ncols=True,
               disable=not (sys.stderr.isatty() if progress is None else progress))
    try:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            try:
                results = list(zip(chunk, predict_batch(chunk), [None] * len(chunk)))
            except CnnlabError:
                results = [_one(predict_batch, f) for f in chunk]
            yield from results
            bar.update(len(chunk))
    finally:
        bar.close()


def predictions(predict_batch: Callable[[list[Path]], list[dict]], files: list[Path],
                batch_size: int) -> Iterator[tuple[Path, dict]]:
    """(file, prediction) for each readable file; the others are reported on stderr and skipped.

    Raises:
        DataError: The only file given cannot be read (its own error), or none of them can.
    """
    done = skipped = 0
    for path, p, why in predict_stream(predict_batch, files, batch_size):
        if p is None and len(files) == 1:
            raise DataError(why)  # a single file: its error is the command's one line
        if p is None:
            skipped += 1
            why = why.removeprefix(f"{path}: ")  # an image's error starts with its name, which the line gives
            print(f"cnnlab: skipped {printable(str(path))}: {why}", file=sys.stderr)
            continue
        done += 1
        yield path, p
    if not done:
        raise DataError(f"none of the {len(files)} files could be read")
    if skipped:
        print(f"cnnlab: {done} file(s) predicted, {skipped} skipped", file=sys.stderr)


def _one(predict_batch, path: Path) -> tuple[Path, dict | None, str | None]:
    try:
        return path, predict_batch([path])[0], None
    except CnnlabError as e:
        return path, None, str(e)


class PredictionWriter:
    """Writes one line per prediction as text, CSV (file,label,probability,top_k) or JSON lines.

    The CSV's ``top_k`` cell is ``label:probability`` pairs joined by ``;``, with ``%``, ``:`` and ``;`` in a class
    name URL-escaped (see `_cell_label`); the ``label`` column and the ``prob_CLASS`` headers hold names as they are.

    Args:
        fmt: ``text``, ``csv`` or ``jsonl``.
        stream: Where the lines go.
        classes: The run's class names to add every class probability (in class order) to each line: a
            ``probabilities`` list (JSON lines), a ``prob_CLASS`` column per class (CSV), an ``all:`` list
            (text). None: the top-k only.
    """

    def __init__(self, fmt: str, stream: TextIO, classes: list[str] | None = None):
        self.fmt, self.stream, self.classes = fmt, stream, classes
        if fmt == "csv":
            self.csv = csv.writer(stream, lineterminator="\n")
            self.csv.writerow(["file", "label", "probability", "top_k", *(f"prob_{c}" for c in classes or ())])

    def write(self, path: Path, p: dict) -> None:
        top = [{"label": t["label"], "probability": round(t["probability"], 6)} for t in p["top_k"]]
        every = p["probabilities"] if self.classes is not None else None
        if self.fmt == "jsonl":
            line = {"file": str(path), "label": p["label"], "probability": round(p["probability"], 6), "top_k": top}
            if every is not None:
                line["probabilities"] = [round(v, 6) for v in every]
            self.stream.write(json.dumps(line) + "\n")
        elif self.fmt == "csv":
            self.csv.writerow([str(path), p["label"], f"{p['probability']:.6f}",
                               ";".join(f"{_cell_label(t['label'])}:{t['probability']:.6f}" for t in top),
                               *(f"{v:.6f}" for v in every or ())])
        else:
            text = ", ".join(f"{printable(t['label'])} {t['probability']:.3f}" for t in top)
            rest = "" if every is None else "   all: " + ", ".join(
                f"{printable(c)} {v:.3f}" for c, v in zip(self.classes, every))
            self.stream.write(f"{printable(str(path))}: {printable(p['label'])} ({p['probability']:.3f})   "
                              f"top-{len(top)}: {text}{rest}\n")


def _cell_label(label: str) -> str:
    """A class name inside the CSV's ``top_k`` cell (``label:probability;...``): its own ``%``, ``:`` and ``;`` as
    ``%25``, ``%3A``, ``%3B`` (URL escapes, undone by ``urllib.parse.unquote``), so the cell splits unambiguously."""
    return label.replace("%", "%25").replace(":", "%3A").replace(";", "%3B")


def _open(out: str | Path | None) -> tuple[TextIO, Path | None]:
    """The stream predictions are written to, and the temp file behind it when ``out`` is replaced at the end.

    Standard output, or for ``out``: a regular or new file is written to a temp file beside it (see
    `rundir.temp_path`) that `write_predictions` renames over ``out`` once everything is written, so a failure
    halfway (a full disk, Ctrl-C) leaves the earlier file as it was and no partial one. Anything else that
    exists (a FIFO, ``/dev/stdout``, a symlink) is written in place. Temp files of ``out`` that an earlier, killed
    run left (SIGKILL gives no chance to clean up) are removed first.
    """
    if out is None:
        return sys.stdout, None
    path = Path(out)
    tmp = None if path.is_symlink() or (path.exists() and not path.is_file()) else rundir.temp_path(path)
    if tmp is not None:
        rundir.remove_stale_temps_of(path)
    try:
        return open(tmp or path, "w", encoding="utf-8", newline=""), tmp  # noqa: SIM115  (closed by the caller)
    except OSError as e:
        raise CnnlabError(f"cannot write {out}: {e.strerror or e}") from None


def write_predictions(results: Iterable[tuple[Path, dict]], fmt: str, out: str | Path | None = None,
                      classes: list[str] | None = None) -> None:
    """Write (file, prediction) pairs in ``fmt`` to ``out`` (None: standard output).

    A file ``out`` gets its new content whole or not at all (see `_open`): a run that fails at any point (an
    unreadable checkpoint, no readable image, a full disk, Ctrl-C) leaves an existing ``out`` as it was.

    Args:
        results: What `predictions` yields.
        fmt: ``text``, ``csv``, ``jsonl`` (one line per file, streamed) or ``json`` (one document, a list).
        out: Output file.
        classes: The run's class names to include every class probability (see `PredictionWriter`).

    Raises:
        CnnlabError: ``out`` cannot be written (a folder, a missing parent folder, no permission, a full disk).
    """
    stream, tmp = None, None
    try:
        if fmt == "json":  # one JSON document (kept for scripts written against it); jsonl streams instead
            doc = [{"file": str(path), **{k: v for k, v in p.items() if k != "probabilities" or classes is not None}}
                   for path, p in results]
            stream, tmp = _open(out)
            stream.write(json.dumps(doc, indent=2) + "\n")
        else:
            writer = None
            for path, p in results:
                if writer is None:  # opened at the first prediction: nothing is created when none can be made
                    stream, tmp = _open(out)
                    writer = PredictionWriter(fmt, stream, classes)
                writer.write(path, p)
        if stream is not None and stream is not sys.stdout:
            if tmp is not None:  # on disk before the rename, as cnnlab's atomic writes (on failure: closed below)
                stream.flush()
                os.fsync(stream.fileno())
            stream, f = None, stream
            f.close()
            if tmp is not None:
                io.replace_durably(tmp, out)
                tmp = None
    except OSError as e:  # images are read through cnnlab's readers (their errors are CnnlabError): a write failed
        if out is None:  # standard output's own failures (a closed pipe) are the CLI's to handle
            raise
        raise CnnlabError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if stream is not None and stream is not sys.stdout:
            with contextlib.suppress(OSError):  # already failing: the first error is the one to report
                stream.close()
        if tmp is not None:  # failed or interrupted: the partial file goes, an earlier ``out`` stays
            tmp.unlink(missing_ok=True)
