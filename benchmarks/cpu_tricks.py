"""What each CPU-side trick buys: tf-estimator-cnn training throughput (batch 100, SGD) with the tricks added one
by one, each measurement in a fresh process, rounds alternating, median.

    python benchmarks/cpu_tricks.py [--rounds 3] [--steps 200] [--model tf-estimator-cnn]
    python benchmarks/cpu_tricks.py --python /other/venv/bin/python [--rows all]   # two torch builds side by side

Rows (cumulative):
  plain           glibc malloc defaults (CNNLAB_MALLOC=system), the model's own layer order, torch's dropout
  + malloc        glibc keeps freed memory (cnnlab.runtime.tune_allocator, what the `cnnlab` command does)
  + pool first    max-pool before ReLU (exact; cnnlab.models.layers.pool_before_relu, what training does)
  + fast dropout  cnnlab's Dropout (mask from uniform >= p) in place of torch's bernoulli_ mask
  + oneDNN dense  fp32 dense layers through oneDNN rather than MKL (cnnlab.models.layers.OneDnnLinear; what training
                  does on non-Intel x86 CPUs, see cnnlab.runtime.linear_backend); bf16 already runs there
Each row at fp32 and at bf16 autocast, channels_last. Also prints page faults per step. With ``--python`` (repeatable)
every row also runs under those interpreters (e.g. a venv with another torch build, cnnlab's source on its path),
interleaved with this one in each round, so two builds are compared in one run on the same host.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import hardware_line, print_table, run_worker_json, value_range

WORKER = textwrap.dedent("""
    import json, resource, sys
    model, steps, precision = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    malloc, reorder, fast_dropout, onednn = map(int, sys.argv[4:8])
    from cnnlab.runtime import tune_allocator
    if malloc:
        assert tune_allocator()
    from torch import nn
    from cnnlab.models import layers
    if not fast_dropout:
        layers.Dropout.forward = nn.Dropout.forward  # torch's own mask (bernoulli_)
    from cnnlab.bench import train_throughput
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    r = train_throughput(model, batch_size=100, steps=steps, warmup=20, precision=precision, reorder=bool(reorder),
                         linear="onednn" if onednn else "torch")
    r["faults_per_step"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / (steps + 20)
    print(json.dumps(r))
""")

ROWS = [("plain", 0, 0, 0, 0), ("+ malloc", 1, 0, 0, 0), ("+ pool first", 1, 1, 0, 0), ("+ fast dropout", 1, 1, 1, 0),
        ("+ oneDNN dense", 1, 1, 1, 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--model", default="tf-estimator-cnn")
    ap.add_argument("--python", action="append", default=[],
                    help="also run every row under this interpreter (repeatable), interleaved with this one")
    ap.add_argument("--rows", choices=["all", "plain-and-all"], default="all",
                    help="plain-and-all: only the first row and the row with every trick (quicker comparisons)")
    args = ap.parse_args()
    print(hardware_line(), flush=True)
    rows_run = ROWS if args.rows == "all" else [ROWS[0], ROWS[-1]]
    pythons = [sys.executable, *args.python]
    versions = {py: _torch_version(py) for py in pythons}
    res: dict[tuple[str, str, str], list[dict]] = {}
    for r in range(args.rounds):
        for prec in ("fp32", "bf16"):
            for name, *flags in rows_run:
                for py in pythons:
                    cmd = [py, "-c", WORKER, args.model, str(args.steps), prec, *map(str, flags)]
                    res.setdefault((versions[py], name, prec), []).append(run_worker_json(cmd, {"CNNLAB_MALLOC": ""}))
        print(f"round {r + 1} done", flush=True)
    rows = []
    first = versions[sys.executable]
    for prec in ("fp32", "bf16"):
        for name, *_ in rows_run:
            for py in pythons:
                v = res[(versions[py], name, prec)]
                sps = statistics.median(x["samples_per_s"] for x in v)
                base = statistics.median(x["samples_per_s"] for x in res[(versions[py], "plain", prec)])
                ref = statistics.median(x["samples_per_s"] for x in res[(first, name, prec)])
                rows.append([versions[py], prec, name, f"{sps:.0f}", value_range(x["samples_per_s"] for x in v),
                             f"{sps / base:.2f}x", f"{sps / ref:.2f}x",
                             f"{statistics.median(x['faults_per_step'] for x in v):.0f}"])
    print()
    print(f"{args.model}, batch 100, SGD, channels_last; median of {args.rounds} rounds x {args.steps} steps")
    print_table(["torch", "precision", "tricks", "samples/s", "range", "vs plain", f"vs torch {first}",
                 "page faults/step"], rows)
    return 0


def _torch_version(python: str) -> str:
    """The torch version an interpreter imports (one line, or the benchmark ends with its error)."""
    cmd = [python, "-c", "import json, torch; print(json.dumps({'v': torch.__version__}))"]
    return run_worker_json(cmd)["v"]


if __name__ == "__main__":
    sys.exit(main())
