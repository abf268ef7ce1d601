"""Reproduce the five tutorials: train each recipe on the real data and compare with the reported accuracy.

    python benchmarks/reproduce.py                      # all five, CIFAR-10 shortened to 30,000 steps
    python benchmarks/reproduce.py --only lenet5-mnist  # one recipe
    python benchmarks/reproduce.py --cifar-steps 150000 # the CIFAR-10 tutorial at full length (~1 h here)

Data: set CNNLAB_DATA (e.g. ../shared/data) or pass --data-dir. Each recipe runs in a fresh process
(``python -m cnnlab train``); wall time includes start-up and data loading. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import hardware_line, print_table, run_cli_train

from cnnlab.config import load_recipe

RECIPES = ["tf2-convnet-mnist", "tf-core-convnet-mnist", "tf-estimator-cnn-mnist", "lenet5-mnist",
           "cifar10-prettytensor"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=RECIPES, help="recipes to run")
    ap.add_argument("--cifar-steps", type=int, default=30000, help="steps for cifar10-prettytensor (tutorial: 150000)")
    ap.add_argument("--out", default="bench-out/reproduce", help="run directories (deleted and recreated)")
    ap.add_argument("--data-dir", help="dataset root (else $CNNLAB_DATA, ~/.cache/cnnlab)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.data_dir:
        os.environ["CNNLAB_DATA"] = args.data_dir

    print(hardware_line())
    rows = []
    for name in args.only:
        recipe = load_recipe(name)
        ref = recipe.reference
        model_dir = Path(args.out) / name
        shutil.rmtree(model_dir, ignore_errors=True)
        overrides = [f"--seed={args.seed}"]
        if name == "cifar10-prettytensor":
            overrides.append(f"--steps={args.cifar_steps}")
        model_dir.mkdir(parents=True, exist_ok=True)
        res = run_cli_train(name, model_dir, overrides, log_file=model_dir.parent / f"{name}.log")
        ref_len = f"{ref['steps']} steps" if "steps" in ref else f"{ref['epochs']} epochs"
        full = "full" if name != "cifar10-prettytensor" or args.cifar_steps >= ref.get("steps", 0) else "shortened"
        acc, want = res["test"]["accuracy"], ref["accuracy"]
        rows.append([name, recipe.values["model"], f"{want:.2%}", ref_len, f"{acc:.2%}", f"{(acc - want) * 100:+.2f}",
                     f"{res['step']} ({full})", f"{res['wall']:.0f} s"])
        print(f"{name}: {acc:.4f} (tutorial {want:.4f}) in {res['wall']:.0f} s", flush=True)
    print()
    print_table(["recipe", "model", "tutorial acc", "tutorial length", "cnnlab acc", "diff (pts)", "cnnlab steps",
                 "wall"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
