"""Shared helpers for the benchmark scripts: hardware description, table printing, running the CLI."""

from __future__ import annotations

import json
import os
import shutil
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
    """Run ``python -m cnnlab train`` in a fresh process; return results.json plus the process wall time.

    A failing run ends the benchmark with cnnlab's one-line error (or the log's last line) and the log's path.
    """
    cmd = [sys.executable, "-m", "cnnlab", "train", "--recipe", recipe, "--model-dir", str(model_dir),
           "--no-progress", *overrides]
    t0 = time.perf_counter()
    with open(log_file or os.devnull, "w") as log:
        proc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = Path(log_file).read_text(errors="replace").splitlines() if log_file else []
        errors = [line for line in lines if line.startswith("cnnlab: error:")]
        last = (errors or lines or [f"exit code {proc.returncode}"])[-1]
        raise SystemExit(f"run {model_dir.name} failed: {last}" + (f" (log: {log_file})" if log_file else ""))
    result = json.loads((model_dir / "results.json").read_text())
    result["wall"] = wall
    return result


def ensure_trained_run(run_dir: str | Path | None, out: Path, name: str, overrides: list[str],
                       recipe: str = "lenet5-mnist", log=sys.stdout) -> Path:
    """``run_dir`` when given (it must be a run directory), else ``out/name``: a ``recipe`` run with ``overrides``,
    trained once. A later call reuses it once its training finished (results.json written); a run that stopped
    part-way (a checkpoint but no results) is cleared and trained again. Progress lines go to ``log``."""
    if run_dir:
        run = Path(run_dir)
        if not (run / "config.json").is_file():
            raise SystemExit(f"{Path(sys.argv[0]).stem}: not a run directory: {run}")
        return run
    run = out / name
    if (run / "results.json").is_file():
        return run
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    print(f"training a {recipe} run in {run} ...", file=log, flush=True)
    res = run_cli_train(recipe, run, overrides, log_file=out / f"{name}.log")
    print(f"trained: test accuracy {res['test']['accuracy']:.4f} in {res['wall']:.0f} s", file=log, flush=True)
    return run


def run_worker_json(cmd: list[str], env: dict | None = None) -> dict:
    """Run a benchmark worker in a fresh process (``env`` added to ours); return the JSON of its last line.

    A failing worker ends the benchmark with its last stderr line.
    """
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit code {out.returncode}"
        raise SystemExit(f"{Path(cmd[0]).name} worker failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def value_range(values, fmt: str = "{:.0f}", unit: str = "") -> str:
    """'lo-hi' of some measurements, each formatted with ``fmt``, then ``unit``."""
    values = list(values)
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}{unit}"


# The reference workload every host runs before its results: training steps of the tf.estimator tutorial CNN
# (conv32 5x5 - pool - conv64 5x5 - pool - dense 1024 - dense 10) at batch 100 in fp32 on random resident data.
# A result divided by its time (or by the peak probe) is comparable across hosts; seconds alone are not.
REFERENCE = {"model": "tf-estimator-cnn", "batch_size": 100, "precision": "fp32"}


def host_info() -> dict:
    """What the host is: CPU name, logical CPUs, torch threads, torch and cnnlab versions (JSON-able)."""
    info = {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cnnlab": code_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_probe(repeats: int = 3) -> dict:
    """This host's practical peak FLOP/s per precision (`cnnlab.bench.peak_flops`), in one dict.

    With AVX512-BF16 a bf16 dot product does twice the FLOPs of an fp32 FMA per instruction, so the fp32 peak
    is taken as at least half the bf16 one (PyTorch's fp32 kernels themselves may fall short of it).

    Returns {'fp32': FLOP/s, 'bf16': FLOP/s, 'probes': {precision: {probe name: FLOP/s}}}.
    """
    from cnnlab.bench import peak_flops

    bf16, fp32 = peak_flops(torch.bfloat16, repeats=repeats), peak_flops(torch.float32, repeats=repeats)
    return {"fp32": max(fp32["flops"], bf16["flops"] / 2), "bf16": bf16["flops"],
            "probes": {"fp32": fp32["probes"], "bf16": bf16["probes"]}}


def reference_workload(steps: int = 50) -> dict:
    """Time ``steps`` training steps of the `REFERENCE` workload (after a warm-up), in this process.

    Returns {'seconds': for the ``steps`` steps, 'samples_per_s', 'flops_per_s', plus the workload's description}.
    """
    from cnnlab.bench import train_throughput

    r = train_throughput(REFERENCE["model"], batch_size=REFERENCE["batch_size"], steps=steps, warmup=10,
                         precision=REFERENCE["precision"])
    return {**REFERENCE, "steps": steps, "seconds": steps * r["step_ms"] / 1e3,
            "samples_per_s": r["samples_per_s"], "flops_per_s": r["flops_per_s"]}


def host_reference(ref_steps: int = 50, peak_repeats: int = 3) -> dict:
    """The host block printed with every host-independent table: `host_info`, `peak_probe`, `reference_workload`."""
    return {**host_info(), "peak": peak_probe(peak_repeats), "reference": reference_workload(ref_steps)}


def host_lines(host: dict) -> list[str]:
    """The host block as text: the hardware line, the peaks and the reference workload's time."""
    ref, peak = host["reference"], host["peak"]
    return [hardware_line(),
            f"peak probe: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s",
            (f"reference workload ({ref['model']}, batch {ref['batch_size']}, {ref['precision']}, {ref['steps']} "
             f"training steps): {ref['seconds']:.2f} s = {ref['samples_per_s']:.0f} samples/s")]


def seconds_ratios(seconds: float, host: dict, precision: str = "fp32") -> dict:
    """A time stated against the host: in reference-workload units and as work at the host's peak.

    ``per_reference``: ``seconds`` / the reference workload's seconds (a slower host takes longer for both).
    ``peak_tflop``: ``seconds`` x the peak FLOP/s of ``precision``, in TFLOP (what the peak could do meanwhile).
    """
    return {"seconds": seconds, "per_reference": seconds / host["reference"]["seconds"],
            "peak_tflop": seconds * host["peak"][precision] / 1e12}


def print_json(obj: dict, out=sys.stdout) -> None:
    """One JSON object on one line (the last line of a benchmark's output with --json)."""
    print(json.dumps(obj, default=str), file=out)
