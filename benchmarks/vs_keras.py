"""cnnlab vs Keras (tensorflow-cpu): training throughput of the tutorial MNIST CNN at batch 100, side by side.

    python benchmarks/vs_keras.py [--rounds 5] [--keras-venv bench-out/keras-venv] [--no-keras-malloc] [--json]
    python benchmarks/vs_keras.py --no-keras --rounds 1 --steps 20     # cnnlab's side and the host block only

Keras runs in its own virtual environment, created by this script on first use (`pip install tensorflow-cpu`).
Both sides run in fresh processes, alternately, with their default thread settings on the same machine; each
measures steady-state samples/s of the same model (tf.estimator guide: conv32 5x5 - pool - conv64 5x5 - pool -
dense 1024 - dropout 0.4 - dense 10; SGD lr 0.001; batch 100) on in-memory data after a warm-up. The ratio is of
the medians; each row also shows its min-max over the rounds (Keras's rounds are bimodal on some hosts). Also
reports the fraction of the CPU's peak that cnnlab reaches: for each precision the best of several matmul and
convolution probes (cnnlab.bench.peak_flops), since no single shape reaches the peak.

The `cnnlab` command tunes glibc malloc (cnnlab.runtime); for a like-for-like view Keras also runs a second time
with the same tuning through glibc's environment variables (rows "malloc tuned"; off with --no-keras-malloc).

Samples/s differ from host to host, so the same run also times a small reference workload (benchmarks/common.py)
and states each rate as a ratio to it ("x ref") and to the peak ("of peak"); compare those across hosts.
``--json`` prints one JSON object (per-framework medians and per-round rows, host) instead of the table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    host_lines,
    host_reference,
    print_json,
    print_table,
    run_worker_json,
    value_range,
)

from cnnlab.runtime import GLIBC_ENV  # the malloc tuning the cnnlab command applies

KERAS_WORKER = textwrap.dedent("""
    import json, os, sys, time
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np, tensorflow as tf, keras
    from keras import layers
    steps, epochs, precision = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 256, (steps * 100, 28, 28, 1), dtype=np.uint8) / 255.0).astype("float32")
    y = rng.integers(0, 10, steps * 100).astype("int32")
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(32, 5, padding="same", activation="relu"), layers.MaxPooling2D(2, 2),
        layers.Conv2D(64, 5, padding="same", activation="relu"), layers.MaxPooling2D(2, 2),
        layers.Flatten(), layers.Dense(1024, activation="relu"), layers.Dropout(0.4),
        layers.Dense(10, dtype="float32")])
    model.compile(optimizer=keras.optimizers.SGD(0.001),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    times = []
    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None): self.t = time.perf_counter()
        def on_epoch_end(self, epoch, logs=None): times.append(time.perf_counter() - self.t)
    model.fit(x, y, batch_size=100, epochs=epochs, verbose=0, shuffle=True, callbacks=[Timer()])
    median = sorted(times[1:])[len(times[1:]) // 2]  # epoch 1 is the warm-up (tracing)
    print(json.dumps({"samples_per_s": steps * 100 / median, "tf": tf.__version__, "keras": keras.__version__,
                      "threads": [tf.config.threading.get_intra_op_parallelism_threads(),
                                  tf.config.threading.get_inter_op_parallelism_threads()]}))
""")

CNNLAB_WORKER = textwrap.dedent("""
    import json, sys, torch
    from cnnlab.bench import train_throughput
    from cnnlab.runtime import tune_allocator
    tune_allocator()  # as the cnnlab command does
    r = train_throughput("tf-estimator-cnn", batch_size=100, steps=int(sys.argv[1]), warmup=20,
                         precision=sys.argv[2], channels_last=True)
    r["threads"] = torch.get_num_threads()
    print(json.dumps(r))
""")


def ensure_keras(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"creating {venv} with tensorflow-cpu (one time, a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "tensorflow-cpu"], check=True)
    return py


def measure(args, kpy: Path | None, log) -> dict[str, list[dict]]:
    """Alternating rounds of fresh worker processes; {row name: [one worker result per round]}."""
    with tempfile.TemporaryDirectory() as tmp:
        kscript, cscript = Path(tmp) / "keras_worker.py", Path(tmp) / "cnnlab_worker.py"
        kscript.write_text(KERAS_WORKER)
        cscript.write_text(CNNLAB_WORKER)
        names = [] if kpy is None else (
            ["keras fp32", "keras bf16"] + ([] if args.no_keras_malloc else ["keras-malloc fp32", "keras-malloc bf16"]))
        runs: dict[str, list[dict]] = {k: [] for k in names + ["cnnlab fp32", "cnnlab bf16"]}
        for r in range(args.rounds):
            for prec in ("fp32", "bf16"):
                if kpy is not None:
                    kcmd = [str(kpy), str(kscript), str(args.steps), "4", prec]
                    runs[f"keras {prec}"].append(run_worker_json(kcmd))
                    if not args.no_keras_malloc:
                        runs[f"keras-malloc {prec}"].append(run_worker_json(kcmd, GLIBC_ENV))
                runs[f"cnnlab {prec}"].append(run_worker_json([sys.executable, str(cscript), str(args.steps), prec]))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['samples_per_s']:.0f}" for k, v in runs.items())
                  + " samples/s", file=log, flush=True)
    return runs


def summarise(runs: dict[str, list[dict]], host: dict, steps: int) -> dict[str, dict]:
    """Per row: median samples/s, the time of ``steps`` batches of 100 at that rate, and the host ratios."""
    ref = host["reference"]
    out = {}
    for name, v in runs.items():
        prec = name.split()[1]
        med = statistics.median(r["samples_per_s"] for r in v)
        row = {"precision": prec, "median_samples_per_s": med, "median_seconds": steps * 100 / med,
               "per_reference": med / ref["samples_per_s"], "rounds": v}
        keras = runs.get(f"keras {prec}")
        if keras:
            row["vs_keras_same_precision"] = med / statistics.median(r["samples_per_s"] for r in keras)
        if name.startswith("cnnlab"):
            row["flops_per_s"] = statistics.median(r["flops_per_s"] for r in v)
            row["peak_fraction"] = row["flops_per_s"] / host["peak"][prec]
        out[name] = row
    return out


def label(name: str, rows: dict[str, list[dict]]) -> str:
    prec = name.split()[1]
    if name.startswith("cnnlab"):
        return f"cnnlab, {'bf16 autocast' if prec == 'bf16' else 'fp32'}, channels_last"
    k0 = rows["keras fp32"][0]
    return (f"Keras {k0['keras']} (TF {k0['tf']}), {'mixed_bfloat16' if prec == 'bf16' else 'fp32'}"
            + (", malloc tuned" if name.startswith("keras-malloc") else ""))


def table(summary: dict[str, dict], runs: dict[str, list[dict]]) -> list[list]:
    rows = []
    kfp32 = summary.get("keras fp32")
    for name, s in summary.items():
        v = runs[name]
        row = [label(name, runs), f"{s['median_samples_per_s']:.0f}", value_range(r["samples_per_s"] for r in v),
               f"{s['per_reference']:.2f}x",
               f"{s['median_samples_per_s'] / kfp32['median_samples_per_s']:.2f}x" if kfp32 else "-",
               f"{s['vs_keras_same_precision']:.2f}x" if "vs_keras_same_precision" in s else "-"]
        if name.startswith("cnnlab"):
            row += [f"{s['flops_per_s'] / 1e9:.0f} GFLOP/s = {s['peak_fraction']:.0%} of peak",
                    f"torch {v[0]['threads']}"]
        else:
            row += ["", f"TF intra/inter {runs['keras fp32'][0]['threads']} (0 = all cores)"]
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (fresh processes each)")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    ap.add_argument("--keras-venv", default="bench-out/keras-venv")
    ap.add_argument("--no-keras-malloc", action="store_true", help="skip Keras with cnnlab's malloc tuning")
    ap.add_argument("--no-keras", action="store_true", help="measure cnnlab's side only (no Keras install)")
    ap.add_argument("--ref-steps", type=int, default=50, help="training steps of the reference workload")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.ref_steps < 1:
        raise SystemExit("vs_keras: --rounds, --steps and --ref-steps must be >= 1")
    kpy = None if args.no_keras else ensure_keras(Path(args.keras_venv))
    log = sys.stderr if args.json else sys.stdout
    # The host block comes first, before any worker runs, so both are measured on the machine as it is now.
    host = host_reference(args.ref_steps)
    print("\n".join(host_lines(host)), file=log, flush=True)
    runs = measure(args, kpy, log)
    summary = summarise(runs, host, args.steps)
    if args.json:
        print_json({"host": host, "model": "tf-estimator-cnn", "batch_size": 100, "steps": args.steps,
                    "rounds": args.rounds, "results": summary})
        return 0
    peak = host["peak"]
    print()
    print(f"tf-estimator-cnn, batch 100, SGD; median of {args.rounds} rounds x {args.steps} steps; "
          f"{runs['cnnlab fp32'][0]['flops_per_sample'] / 1e6:.1f} MFLOP per training sample; x ref: samples/s over "
          f"the reference workload's; CPU peak here: bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s, "
          f"fp32 {peak['fp32'] / 1e9:.0f}")
    print("peak probes, GFLOP/s: " + "; ".join(f"{prec} " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in p.items())
                                             for prec, p in peak["probes"].items()))
    print_table(["framework", "samples/s", "range", "x ref", "vs Keras fp32", "vs Keras same precision", "FLOP/s",
                 "threads"], table(summary, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
