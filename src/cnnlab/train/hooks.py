"""What happens around the loop: progress bar, log lines, metrics log. Each hook sees the same records.

A record is a dict with ``kind`` ('train' or 'eval') and ``step``; train records carry loss, acc, lr and
samples/s (and optionally ``probs``), eval records carry split, loss and accuracy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from ..errors import CnnlabError


class ProgressBar:
    """A tqdm bar over the optimisation steps (shown when stderr is a terminal)."""

    def __init__(self, total: int, initial: int, enabled: bool | None = None):
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False,
                        disable=(not sys.stderr.isatty()) if enabled is None else not enabled)
        self.last = initial

    def on_record(self, rec: dict) -> None:
        if rec["kind"] == "train":
            self.bar.update(rec["step"] - self.last)
            self.last = rec["step"]
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['acc']:.3f}", refresh=False)

    @property
    def shown(self) -> bool:
        return not self.bar.disable

    def write(self, line: str) -> None:
        """Print a line without breaking the bar."""
        tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()


class ConsoleLog:
    """One line per record, as the tutorials print them (and their LoggingTensorHook's probabilities)."""

    def __init__(self, write, total: int):
        self.write = write
        self.width = len(str(total))
        self.total = total

    def on_record(self, rec: dict) -> None:
        if rec["kind"] == "train":
            line = (f"step {rec['step']:>{self.width}}/{self.total}  loss {rec['loss']:.4f}  "
                    f"batch acc {rec['acc']:.4f}  lr {rec['lr']:.3g}  {rec['samples_per_s']:.0f} img/s")
            for i, p in enumerate(rec.get("probs", [])):
                line += f"\n  probabilities[{i}] = [" + " ".join(f"{v:.4f}" for v in p) + "]"
        else:
            line = (f"eval  {rec['split']} @ step {rec['step']}: accuracy {rec['accuracy']:.4f}  "
                    f"loss {rec['loss']:.4f}  ({rec['n']} images)")
        self.write(line)

    def close(self) -> None:
        pass


class MetricsLog:
    """Appends each record as one JSON line to ``metrics.jsonl`` in the run directory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.f = open(self.path, "a", encoding="utf-8")

    def on_record(self, rec: dict) -> None:
        rec = {k: v for k, v in rec.items() if k != "probs"}
        try:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
        except OSError as e:  # e.g. ENOSPC: the checkpoints are whole, only this log line is lost
            raise CnnlabError(f"cannot append to {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        try:
            self.f.close()
        except OSError as e:  # the buffered last line could not be written (e.g. ENOSPC)
            raise CnnlabError(f"cannot append to {self.path}: {e.strerror or e}") from None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (written after the checkpoint a resumed run restarts from)."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_bytes().splitlines():
        try:
            text = line.decode("utf-8")
            record = json.loads(text)
        except (ValueError, RecursionError):  # a line cut by a crash, or damaged (not UTF-8, not JSON): dropped
            continue
        at = record.get("step", 0) if isinstance(record, dict) else None
        if isinstance(at, (int, float)) and at <= step:
            kept.append(text)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
