"""Out-of-distribution digits: how well each MNIST recipe reads digits that are not from MNIST.

    python benchmarks/ood_digits.py                                  # train every MNIST recipe once, seed 0
    python benchmarks/ood_digits.py --only mnist-fast tf2-convnet-mnist --seeds 0 1
    python benchmarks/ood_digits.py --runs runs/a runs/b --json      # score existing run directories
    python benchmarks/ood_digits.py --runs runs/a --source hand      # the pen-drawn digits instead of the fonts

The OOD set (``--source fonts``, the default) is `cnnlab.data.ood_digits`: digits 0-9 rendered from the fonts
bundled with matplotlib at random sizes, stroke widths, slants, widths, rotations, positions and blurs, framed as
MNIST (white on black, centre of mass centred in 28x28). ``--source hand`` is `cnnlab.data.hand_digits`: the
digits written stroke by stroke in five hands with seeded jitter, drawn with a round pen at random sizes and pen
widths on the web page's canvas, framed the same way. Each run is scored on it as on MNIST's test set: the run's
recorded test-time augmentation and precision, its averaged weights when it kept them. The MNIST column is the run's own
results.json. Training runs need MNIST (set CNNLAB_DATA); accuracy only, no time is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import hardware_line, host_info, print_table, run_cli_train

from cnnlab.config import list_recipes, load_recipe
from cnnlab.data.hand_digits import make_hand_digits
from cnnlab.data.ood_digits import make_ood_digits

SOURCES = {"fonts": (make_ood_digits, "rendered font digits"), "hand": (make_hand_digits, "pen-drawn digits")}
from cnnlab.infer import TrainedModel, load_trained, predict_logits


def mnist_recipes() -> list[str]:
    """Every bundled recipe that trains on MNIST (read from the recipes, so new ones join the table)."""
    return [name for name in list_recipes() if load_recipe(name).values.get("dataset") == "mnist"]


def ood_accuracy(tm: TrainedModel, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of a trained run on the OOD set, predicted as the run's own test evaluation is."""
    cfg = tm.config
    logits = predict_logits(tm.model, images, tta=cfg.get("tta", "none") or "none",
                            precision=cfg.get("precision", "fp32") or "fp32")
    return (logits.argmax(1) == labels).float().mean().item()


def score_run(run_dir: Path, recipe: str, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """One table row: recipe, seed, MNIST test accuracy (from results.json) and OOD accuracy.

    A run does not record its recipe's name, so ``recipe`` labels the row (the directory name for --runs).
    """
    res = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    tm = load_trained(run_dir)
    return {"run": str(run_dir), "recipe": recipe, "seed": tm.config.get("seed"),
            "mnist_accuracy": res.get("test", {}).get("accuracy"),
            "ood_accuracy": ood_accuracy(tm, images, labels)}


def train_runs(recipes: list[str], seeds: list[int], out: Path, extra: list[str]) -> list[tuple[Path, str]]:
    """Train each recipe once per seed into ``out``; returns (run directory, recipe) pairs."""
    dirs = []
    for recipe in recipes:
        for seed in seeds:
            run = out / f"{recipe}-s{seed}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            run_cli_train(recipe, run, [f"--seed={seed}", "--no-report", *extra], log_file=out / f"{run.name}.log")
            print(f"trained {run}", file=sys.stderr, flush=True)
            dirs.append((run, recipe))
    return dirs


def summarise(rows: list[dict]) -> list[list]:
    """Per recipe: runs, mean MNIST accuracy, mean and min/max OOD accuracy."""
    table = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        rs = [r for r in rows if r["recipe"] == recipe]
        mn = [r["mnist_accuracy"] for r in rs if r["mnist_accuracy"] is not None]
        ood = [r["ood_accuracy"] for r in rs]
        table.append([recipe, len(rs), ",".join(str(r["seed"]) for r in rs),
                      f"{statistics.fmean(mn):.2%}" if mn else "-", f"{statistics.fmean(ood):.1%}",
                      f"{min(ood):.1%}-{max(ood):.1%}"])
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", type=Path,
                    help="score these trained run directories instead of training (rows named by directory)")
    ap.add_argument("--only", nargs="+", help="train only these recipes (default: every MNIST recipe)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--n", type=int, default=1000, help="size of the OOD set")
    ap.add_argument("--ood-seed", type=int, default=0, help="seed of the OOD set")
    ap.add_argument("--source", choices=sorted(SOURCES), default="fonts",
                    help="the OOD set: digits rendered from fonts, or drawn with pen strokes (hand)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/ood"))
    ap.add_argument("--data-dir")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="overrides passed to every training run")
    args = ap.parse_args()
    if args.n < 1:
        raise SystemExit(f"ood_digits: --n must be >= 1, got {args.n}")
    if args.data_dir:
        os.environ["CNNLAB_DATA"] = args.data_dir
    if args.runs:
        missing = [str(r) for r in args.runs if not r.is_dir()]
        if missing:
            raise SystemExit(f"ood_digits: not a run directory: {', '.join(missing)}")
        runs = [(r, r.name) for r in args.runs]
    else:
        recipes = args.only or mnist_recipes()
        unknown = sorted(set(recipes) - set(mnist_recipes()))
        if unknown:
            raise SystemExit(f"ood_digits: not an MNIST recipe: {', '.join(unknown)}")
        runs = train_runs(recipes, args.seeds, args.out, args.extra)
    make, what = SOURCES[args.source]
    x, y = make(args.n, args.ood_seed)
    images, labels = torch.from_numpy(x)[:, None], torch.from_numpy(y)
    rows = [score_run(r, name, images, labels) for r, name in runs]
    if args.json:
        ood = {"source": args.source, "n": args.n, "seed": args.ood_seed}
        print(json.dumps({"ood": ood, "host": host_info(), "runs": rows}))
        return 0
    print(hardware_line())
    print(f"OOD set: {args.n} {what}, seed {args.ood_seed}")
    print_table(["recipe", "runs", "seeds", "MNIST test acc", "OOD acc (mean)", "OOD min-max"], summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
