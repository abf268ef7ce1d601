"""Time to accuracy: train the fast recipes from a cold process several times and print accuracy vs wall time.

    python benchmarks/time_to_accuracy.py --dataset mnist            # mnist-fast (99.0% / 10 s), mnist-99.5 (3 min)
    python benchmarks/time_to_accuracy.py --dataset cifar10          # cifar10-fast (80% / 3 min)
    python benchmarks/time_to_accuracy.py --dataset cifar10 --long   # + cifar10-90 (90% / 30 min)

Wall time is measured from process start to exit of ``python -m cnnlab train`` (imports, data load from the IDX /
pickle files, training, final test evaluation and checkpoint write included). Each run uses another seed; the table
reports the mean test accuracy and the median wall time over the runs. Needs the datasets (set CNNLAB_DATA).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import hardware_line, print_table, run_cli_train

# (recipe, accuracy target, seconds target)
TARGETS = {
    "mnist": [("mnist-fast", 0.990, 10), ("mnist-99.5", 0.995, 180)],
    "cifar10": [("cifar10-fast", 0.80, 180)],
    "cifar10-long": [("cifar10-90", 0.90, 1800)],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["mnist", "cifar10"], required=True)
    ap.add_argument("--runs", type=int, default=5, help="runs per recipe, seeds 0..runs-1")
    ap.add_argument("--long", action="store_true", help="also run the long CIFAR-10 recipe (90%% in 30 min)")
    ap.add_argument("--only", nargs="*", help="run only these recipes")
    ap.add_argument("--out", default="bench-out/tta")
    ap.add_argument("--data-dir")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="overrides passed to every run")
    args = ap.parse_args()
    if args.data_dir:
        os.environ["CNNLAB_DATA"] = args.data_dir

    plan = TARGETS[args.dataset] + (TARGETS["cifar10-long"] if args.long and args.dataset == "cifar10" else [])
    if args.only:
        plan = [p for p in plan if p[0] in args.only]
    print(hardware_line(), flush=True)
    rows = []
    for recipe, acc_target, sec_target in plan:
        accs, walls = [], []
        for seed in range(args.runs):
            model_dir = Path(args.out) / f"{recipe}-s{seed}"
            shutil.rmtree(model_dir, ignore_errors=True)
            model_dir.mkdir(parents=True)
            res = run_cli_train(recipe, model_dir, [f"--seed={seed}", "--no-report", *args.extra],
                                log_file=Path(args.out) / f"{recipe}-s{seed}.log")
            accs.append(res["test"]["accuracy"])
            walls.append(res["wall"])
            print(f"{recipe} seed {seed}: {accs[-1]:.4f} in {walls[-1]:.1f} s (train loop {res['seconds']:.1f} s)",
                  flush=True)
        mean_acc, med_wall = statistics.fmean(accs), statistics.median(walls)
        ok = mean_acc >= acc_target and med_wall <= sec_target
        rows.append([recipe, f">= {acc_target:.1%} in <= {sec_target} s", len(accs), f"{mean_acc:.2%}",
                     f"{min(accs):.2%}", f"{med_wall:.1f} s", f"{max(walls):.1f} s", "yes" if ok else "NO"])
    print()
    print_table(["recipe", "target", "runs", "mean acc", "min acc", "median wall", "max wall", "met"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
