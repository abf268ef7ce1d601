"""Shared helpers for the benchmark scripts: hardware description, table printing, running the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from cnnlab.runinfo import code_version, cpu_name


def hardware_line() -> str:
    """One line naming the machine, threads and library versions (printed with every table)."""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"hardware: {cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
            f"{gpu}; torch {torch.__version__}; cnnlab {code_version()}")


def print_table(headers: list[str], rows: list[list], out=sys.stdout) -> None:
    """A GitHub-markdown table (pastes straight into the README)."""
    cells = [[str(c) for c in r] for r in rows]
    w = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(headers)) + " |", file=out)
    print("|" + "|".join("-" * (x + 2) for x in w) + "|", file=out)
    for r in cells:
        print("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |", file=out)


def run_cli_train(recipe: str, model_dir: Path, overrides: list[str], log_file: Path | None = None) -> dict:
    """Run ``python -m cnnlab train`` in a fresh process; return results.json plus the process wall time."""
    cmd = [sys.executable, "-m", "cnnlab", "train", "--recipe", recipe, "--model-dir", str(model_dir),
           "--no-progress", *overrides]
    t0 = time.perf_counter()
    with open(log_file or os.devnull, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode} (log: {log_file})")
    result = json.loads((model_dir / "results.json").read_text())
    result["wall"] = wall
    return result


def run_worker_json(cmd: list[str], env: dict | None = None) -> dict:
    """Run a benchmark worker in a fresh process (``env`` added to ours); return the JSON of its last line.

    A failing worker ends the benchmark with its last stderr line.
    """
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit code {out.returncode}"
        raise SystemExit(f"{Path(cmd[0]).name} worker failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def value_range(values, fmt: str = "{:.0f}", unit: str = "") -> str:
    """'lo-hi' of some measurements, each formatted with ``fmt``, then ``unit``."""
    values = list(values)
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}{unit}"
