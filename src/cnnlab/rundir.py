"""A run directory belongs to one `cnnlab train` at a time and holds only files cnnlab wrote.

- **Lock.** Training holds ``fcntl.flock`` on ``RUN/.cnnlab-lock`` (the holder's pid written inside, for the
  message). The kernel drops the lock when the process ends in any way, SIGKILL included, so a lock file left
  by a dead process is simply taken over. A second trainer on the same directory stops with one line naming
  the holder's pid.
- **Ownership.** Before training writes into an existing directory, every entry must be one cnnlab writes
  (`is_owned`): otherwise a user's own ``config.json`` or ``metrics.jsonl`` would be overwritten or cut. Such a
  directory is refused unless ``force``.
- **Temp files.** Atomic writes go through ``.NAME.cnnlab-tmp-PID`` (`temp_path`); only such names (and the
  ``.NAME.tmp-PID`` of older cnnlab versions, for the names cnnlab writes) are ever removed.
- **Preemption.** `on_stop_signals` turns SIGTERM, and a Ctrl-C (SIGINT) during the optimisation steps, into a
  request the loop honours at the end of a step: it saves a checkpoint there and stops with `Preempted` (exit
  code 143 or 130 from the CLI), so the rerun resumes exactly. A second Ctrl-C, or one outside the steps, stops
  at once (KeyboardInterrupt), as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import CnnlabError

LOCK_NAME = ".cnnlab-lock"
TEMP_MARK = ".cnnlab-tmp-"
PREEMPTED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended
INTERRUPTED_EXIT = 130  # 128 + SIGINT
CHECKPOINT = re.compile(r"ckpt-\d{8}\.safetensors")
BEST_CHECKPOINT = "best.safetensors"  # train.controls.BEST_NAME: the best evaluation's weights
# Names cnnlab writes at the top of a run directory (plus checkpoints, temps and the lock).
_WRITTEN = ("config.json", "results.json", "metrics.jsonl", "report.html", "model.onnx")
_OWN_TEMP = re.compile(rf"\.(?P<target>.+){re.escape(TEMP_MARK)}\d+")
_OLD_TEMP = re.compile(r"\.(?P<target>.+)\.tmp-\d+")  # cnnlab before the distinctive mark
OWNED_DIRS = ("plots", "tensorboard")  # `cnnlab plot` default output, `train --tensorboard` default log dir


class RunDirError(CnnlabError):
    """A run directory is in use by another process, or holds files cnnlab did not write."""


class Preempted(CnnlabError):
    """Training stopped on SIGTERM or Ctrl-C after saving a checkpoint at the current step."""

    def __init__(self, step: int, checkpoint: str, signal_name: str = "SIGTERM"):
        super().__init__(f"stopped by {signal_name} at step {step}; saved {checkpoint} "
                         "(rerun the same command to resume)")
        self.step = step
        # what a shell reports for a process the signal ended: 128 + the signal's number
        self.exit_code = INTERRUPTED_EXIT if signal_name == "SIGINT" else PREEMPTED_EXIT


# ---------------------------------------------------------------- temp files

def temp_path(path: Path) -> Path:
    """The temp file an atomic write of ``path`` goes through (same directory, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def is_own_temp(name: str) -> bool:
    """Whether ``name`` is a partial file of a cnnlab atomic write (safe to delete when its writer is gone)."""
    if _OWN_TEMP.fullmatch(name):
        return True
    m = _OLD_TEMP.fullmatch(name)
    return bool(m) and _is_written_name(m["target"])


def _is_written_name(name: str) -> bool:
    return name in _WRITTEN or name == BEST_CHECKPOINT or bool(CHECKPOINT.fullmatch(name)) or name.endswith(".onnx")


def _writer_alive(name: str) -> bool:
    """Whether the process named by a temp file's pid suffix still runs (e.g. an export writing now)."""
    pid = int(name.rsplit("-", 1)[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _remove_if_writer_gone(paths: list[Path]) -> list[Path]:
    """Delete the temp files among ``paths`` whose writer process is gone; return them."""
    stale = [p for p in paths if not _writer_alive(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def remove_stale_temps_of(path: Path) -> list[Path]:
    """Delete the partial files a killed cnnlab write of ``path`` left beside it (``.NAME.cnnlab-tmp-PID`` whose
    writer is gone, e.g. a `predict --out` killed with SIGKILL); return what was removed. Outside run directories,
    where `remove_stale_temps` does not look, only ``path``'s own temp files are touched."""
    path = Path(path)
    try:
        names = [e.name for e in os.scandir(path.parent) if (m := _OWN_TEMP.fullmatch(e.name))
                 and m["target"] == path.name and e.is_file(follow_symlinks=False)]
    except OSError:
        return []
    return _remove_if_writer_gone([path.parent / n for n in names])


def remove_stale_temps(model_dir: Path) -> list[Path]:
    """Delete partial files of cnnlab's own killed writes in ``model_dir``; return what was removed.

    Only names `is_own_temp` accepts are touched: a user's ``notes.tmp-1`` stays.
    """
    d = Path(model_dir)
    own = [p for p in d.iterdir() if is_own_temp(p.name) and p.is_file()] if d.is_dir() else []
    return _remove_if_writer_gone(own)


# ---------------------------------------------------------------- ownership

def _json_object(path: Path) -> dict | None:
    try:
        v = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return v if isinstance(v, dict) else None


def is_run_record(path: Path) -> bool:
    """``config.json`` as training writes it: an object with the config, model and data sections."""
    v = _json_object(path)
    return v is not None and isinstance(v.get("config"), dict) and isinstance(v.get("model"), dict) \
        and isinstance(v.get("data"), dict)


def read_record(path: Path) -> dict:
    """A run's ``config.json`` (empty if there is none); `RunDirError` if the file there is not cnnlab's."""
    path = Path(path)
    if not path.is_file():
        return {}
    if not is_run_record(path):
        raise RunDirError(f"{path} is not a cnnlab run record (not JSON with config, model and data); "
                          "move it away or point at the run's checkpoint file instead")
    return json.loads(path.read_text(encoding="utf-8"))


def _is_results(path: Path) -> bool:
    v = _json_object(path)
    return v is not None and "step" in v and "test" in v


def _is_metrics_log(path: Path) -> bool:
    """Every complete line is a cnnlab record; the last line may be cut by a crash."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                continue
            return False
        if not (isinstance(rec, dict) and rec.get("kind") in ("train", "eval") and "step" in rec):
            return False
    return True


def _has_mark(path: Path, mark: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return mark in f.read()
    except OSError:
        return False


# Top-level name -> check that the file there is cnnlab's (a user may keep a file of the same name).
_CHECKS: dict[str, Callable[[Path], bool]] = {
    "config.json": is_run_record,
    "results.json": _is_results,
    "metrics.jsonl": _is_metrics_log,
    "report.html": lambda p: _has_mark(p, b"<title>cnnlab report"),
}


def is_owned(entry: Path) -> bool:
    """Whether cnnlab wrote this entry of a run directory (and may overwrite, cut or remove it)."""
    name = entry.name
    if name == LOCK_NAME or is_own_temp(name):
        return True
    if name in OWNED_DIRS:
        return entry.is_dir()
    if CHECKPOINT.fullmatch(name) or name == BEST_CHECKPOINT:
        return entry.is_file()
    if name.endswith(".onnx"):  # `cnnlab export` writes its metadata key into the file
        return _has_mark(entry, b"cnnlab_version")
    check = _CHECKS.get(name)
    return check is not None and entry.is_file() and check(entry)


def foreign_entries(model_dir: Path) -> list[str]:
    """Names in ``model_dir`` that cnnlab did not write, sorted."""
    d = Path(model_dir)
    return sorted(p.name for p in d.iterdir() if not is_owned(p)) if d.is_dir() else []


def check_owned(model_dir: Path) -> None:
    """Raise `RunDirError` when ``model_dir`` holds anything cnnlab did not write."""
    foreign = foreign_entries(model_dir)
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunDirError(f"{model_dir} holds files cnnlab did not write ({shown}); use another --model-dir, "
                          "or --force to train there anyway (cnnlab's files in it may then be overwritten)")


def check_not_protected(out: Path, *, reads: Iterable[str | Path] = (), own: Iterable[str] = ()) -> None:
    """Refuse an output path that is a checkpoint, a record of the run directory it is in, or an input.

    Every command that writes a file a user names (``--out``) calls this before it opens, reads or writes
    anything, so a mistyped ``--out`` never costs a trained run or the files being read.

    Args:
        out: The file the command is about to write.
        reads: Files the command reads (images, a checkpoint given by path): an existing ``out`` that is one of
            them (the same file, also through a link) is refused.
        own: Shell-style patterns of the run-directory names this command itself writes and may replace
            (``report.html`` for ``cnnlab report``, ``*.onnx`` for ``cnnlab export``).

    Raises:
        RunDirError: ``out`` is named like a checkpoint, the lock or a temp file; or it is a file training,
            reporting or exporting writes (``config.json``, ``metrics.jsonl``, ``report.html``, ``*.onnx``,
            ...) inside a run directory and not one of ``own``; or it is one of ``reads``.
    """
    out = Path(out)
    name = out.name
    if CHECKPOINT.fullmatch(name) or name in (BEST_CHECKPOINT, LOCK_NAME) or is_own_temp(name):
        raise RunDirError(f"refusing to write over {out}: cnnlab keeps a file of the training run there; "
                          "choose another --out")
    in_run = out.parent.is_dir() and any(CHECKPOINT.fullmatch(p.name) or p.name == BEST_CHECKPOINT
                                         for p in out.parent.iterdir())
    record = name in _WRITTEN or name in OWNED_DIRS or name.endswith(".onnx")
    if in_run and record and not any(fnmatch.fnmatchcase(name, pattern) for pattern in own):
        raise RunDirError(f"refusing to write over {out}: cnnlab keeps a file of the training run there; "
                          "choose another --out")
    try:
        target = out.stat()
    except OSError:  # nothing there (or unreachable): it cannot be one of the inputs
        return
    for path in reads:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            same = f" (the same file as {path})" if Path(path) != out else ""
            raise RunDirError(f"refusing to write over {out}: it is an input of this command{same}; "
                              "choose another --out")


# ---------------------------------------------------------------- lock

def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "a process that has not written its pid yet"


@contextlib.contextmanager
def lock(model_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the block; `RunDirError` naming the holder's pid if it is taken."""
    path = Path(model_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise RunDirError(f"cannot create the lock file {path}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunDirError(f"cannot lock {path}: {e.strerror or e}") from None
            raise RunDirError(f"{model_dir} is in use by another cnnlab train ({_holder(fd)}); wait for it to "
                              "finish or use another --model-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock (the file stays: removing it would race with a new holder)


@contextlib.contextmanager
def claim(model_dir: Path, force: bool = False) -> Iterator[None]:
    """Create ``model_dir`` if needed, lock it, and check it holds only cnnlab's files (unless ``force``).

    When the block fails in a directory this call created, and nothing but the lock and empty files came of it
    (e.g. the data could not be read), the directory is removed again instead of being left as litter.
    """
    model_dir = Path(model_dir)
    if not force:
        check_owned(model_dir)  # first without the lock, so a refused directory gets no lock file either
    created = not model_dir.exists()
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create model directory {model_dir}: {e.strerror or e}") from None
    with lock(model_dir):
        if not force:
            check_owned(model_dir)  # again: it may have changed before the lock was ours
        try:
            yield
        except BaseException:
            if created:
                _remove_if_unused(model_dir)
            raise


def _remove_if_unused(model_dir: Path) -> None:
    """Remove ``model_dir`` if it holds only files (the lock, empty logs), all empty but the lock; else keep it.

    A second trainer that opened the lock file just before it goes would lock a removed file and then fail on
    its first write into the removed directory (one line), so a narrow race costs an error, not a shared run.
    """
    try:
        entries = list(model_dir.iterdir())
        if all(e.is_file() and not e.is_symlink() and (e.name == LOCK_NAME or e.stat().st_size == 0)
               for e in entries):
            for e in entries:  # the lock last: it is held until the directory is gone
                if e.name != LOCK_NAME:
                    e.unlink()
            (model_dir / LOCK_NAME).unlink(missing_ok=True)
            model_dir.rmdir()
    except OSError:  # best effort: the failure being reported matters more than the litter
        pass


# ---------------------------------------------------------------- paths

@contextlib.contextmanager
def utf8_path(path: Path) -> Iterator[str]:
    """A UTF-8 name for ``path`` for readers that take only UTF-8 text (safetensors).

    A file under a directory whose name is not valid UTF-8 (possible on Linux) is opened by its bytes and
    read through ``/proc/self/fd/N``; where that does not exist the error says what to rename.
    """
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        if not os.path.isdir("/proc/self/fd"):
            raise RunDirError(f"the path {text.encode('utf-8', 'replace').decode()!r} is not valid UTF-8, which "
                              "the checkpoint reader needs; rename the directory") from None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    yield text


# ---------------------------------------------------------------- preemption

class StopRequest:
    """Set by SIGTERM, or by Ctrl-C while ``armed`` (the loop's optimisation steps); the loop reads `requested`
    at the end of each step.

    Attributes:
        requested: A stop was asked for.
        signal_name: The signal that asked (SIGTERM or SIGINT).
        armed: Ctrl-C waits for the end of the step (the loop sets it around its steps); otherwise, and for a
            second Ctrl-C, it interrupts at once.
    """

    def __init__(self, run_dir: Path) -> None:
        self.requested = False
        self.signal_name = "SIGTERM"
        self.armed = False
        self.run_dir = Path(run_dir)
        self._pause_at = _env_int("CNNLAB_TEST_PAUSE_AT_STEP")

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.requested or not self.armed:
                raise KeyboardInterrupt
            # os.write, not print: the main thread may be inside a write to stderr (the progress bar)
            os.write(2, b"\ncnnlab: Ctrl-C: saving a checkpoint after this step (Ctrl-C again to stop at once)\n")
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def check(self, step: int) -> bool:
        """Whether to stop after ``step``.

        Test hook: with ``CNNLAB_TEST_PAUSE_AT_STEP=N`` the process creates ``RUN.paused-N`` (beside the run
        directory, not in it) after step N and waits up to a minute for SIGTERM, so a test can deliver the
        signal at a known step.
        """
        if step == self._pause_at:
            Path(f"{self.run_dir}.paused-{step}").touch()
            deadline = time.monotonic() + 60
            while not self.requested and time.monotonic() < deadline:
                time.sleep(0.01)
        return self.requested


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


@contextlib.contextmanager
def on_stop_signals(run_dir: Path, enabled: bool = True) -> Iterator[StopRequest]:
    """Turn SIGTERM and Ctrl-C into a `StopRequest` for the block (only in the main thread; elsewhere it stays
    unset and the signals keep their handlers)."""
    stop = StopRequest(run_dir)
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    # SIGINT only where it would interrupt: a job started with it ignored (`cmd &` in a script) or a caller's
    # own handler keeps it
    signals = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler
                                  else [])
    previous = {sig: signal.signal(sig, stop._on_signal) for sig in signals}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def pause_before_rename(path: Path) -> None:
    """Test hook of atomic writes: ``CNNLAB_TEST_PAUSE_BEFORE_RENAME=GLOB=SECONDS`` sleeps between the write and
    the rename of files whose name matches GLOB, so a test can kill a process inside a write for sure."""
    spec = os.environ.get("CNNLAB_TEST_PAUSE_BEFORE_RENAME")
    if spec:
        import fnmatch

        glob, _, seconds = spec.rpartition("=")
        if fnmatch.fnmatch(Path(path).name, glob):
            time.sleep(float(seconds))
