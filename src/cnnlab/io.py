"""Small file I/O shared by every layer: atomic writes and the JSON-lines reader.

An atomic write leaves either the old file or the new one under the real name, never a part, after a crash.
Used by checkpoints, ``config.json`` / ``results.json``, dataset downloads, reports and ONNX exports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from . import rundir
from .errors import CnnlabError


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable; best effort where directories cannot be fsynced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(src: str | Path, dest: str | Path) -> None:
    """Rename ``src`` onto ``dest`` (same filesystem) and fsync the directory, so the rename survives a crash.

    Raises:
        OSError: The rename failed (``src`` is left in place for the caller to clean up).
    """
    os.replace(src, dest)
    fsync_dir(Path(dest).parent)


def atomic_write_bytes(path: str | Path, data: bytes, error: type[CnnlabError] = CnnlabError) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename, fsync the directory.

    The temp file is named by `rundir.temp_path` (``.NAME.cnnlab-tmp-PID``), so a killed writer's leftovers can be
    told from a user's files and removed.

    Args:
        path: Target file.
        data: The whole new content.
        error: The `CnnlabError` type raised on failure (e.g. `CheckpointError` for checkpoints).

    Returns:
        ``path``.

    Raises:
        CnnlabError: (of type ``error``) the file could not be written; the temp file is removed.
    """
    path = Path(path)
    tmp = rundir.temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        rundir.pause_before_rename(path)  # a test hook, off unless its environment variable is set
        replace_durably(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise error(f"cannot write {path}: {e.strerror or e}") from None
    return path


def atomic_write_text(path: str | Path, text: str, error: type[CnnlabError] = CnnlabError) -> Path:
    """`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), error)


def atomic_write_json(path: str | Path, obj, error: type[CnnlabError] = CnnlabError) -> Path:
    """`atomic_write_bytes` of ``obj`` as indented JSON (as ``config.json`` and ``results.json`` are written)."""
    return atomic_write_text(path, json.dumps(obj, indent=2), error)


def read_jsonl(path: str | Path, skipped: list[int] | None = None,
               keep: Callable[[dict], bool] | None = None) -> list[dict]:
    """All records (JSON objects, one a line) of a JSON-lines file such as ``metrics.jsonl``.

    A line that is not a JSON object in UTF-8 is skipped: the last line may be cut by a crash, and a line
    damaged by anything else should not cost the rest of the file.

    Args:
        path: The file.
        skipped: If given, the 1-based numbers of the skipped lines are appended to it, except a cut last line
            (the expected trace of a crash while appending, not damage).
        keep: If given, only the records it accepts are returned; the others count as skipped.

    Raises:
        OSError: The file cannot be read.
    """
    out = []
    lines = Path(path).read_bytes().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record, parsed = json.loads(line.decode("utf-8")), True
        except (UnicodeDecodeError, ValueError, RecursionError):
            record, parsed = None, False
        if isinstance(record, dict) and (keep is None or keep(record)):
            out.append(record)
        elif skipped is not None and line.strip() and (parsed or number < len(lines) or not _cut_record(line)):
            skipped.append(number)
    return out


def _cut_record(line: bytes) -> bool:
    """Whether ``line`` looks like the start of a JSON object cut short (ASCII, as ``json.dumps`` writes it)."""
    return line.lstrip().startswith(b"{") and line.isascii()
