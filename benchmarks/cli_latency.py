"""How long the command line takes to answer: `--version`, `train --help`, `predict` of one image, `report`.

    python benchmarks/cli_latency.py [--runs 5] [--run RUN_DIR] [--tree DIR ...] [--out bench-out/cli]

Each command runs in a fresh process, from process start to exit, as a user types it. Without ``--run`` a short
`mnist-fast` run (batch norms, as most recipes) is trained once in ``--out`` (needs the MNIST files). ``--tree DIR``
(repeatable) times the cnnlab of another checkout too (``DIR/src`` first on PYTHONPATH), in rounds that alternate
between the trees, and prints each tree's median as a ratio to the first tree's: side by side on one host, so the
ratio holds where seconds vary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_trained_run, hardware_line, print_table, value_range

ROOT = Path(__file__).resolve().parent.parent


def commands(run: Path, image: Path) -> dict[str, list[str]]:
    return {"--version": ["--version"], "train --help": ["train", "--help"],
            "predict RUN IMAGE": ["predict", str(run), str(image)],
            "report RUN": ["report", str(run), "--out", str(run.parent / "report-bench")]}


def time_once(argv: list[str], tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cnnlab", *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise SystemExit(f"cnnlab {' '.join(argv)} failed with {tree}: {last}")
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="rounds; each times every command once per tree")
    ap.add_argument("--run", help="a trained run directory (default: train a short mnist-fast run in --out)")
    ap.add_argument("--tree", action="append", default=[], type=Path,
                    help="another cnnlab checkout to time side by side (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "cli")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    trees = [ROOT, *(t.resolve() for t in args.tree)]
    for t in trees:
        if not (t / "src" / "cnnlab" / "__init__.py").is_file():
            ap.error(f"--tree {t}: no src/cnnlab in it")
    args.out.mkdir(parents=True, exist_ok=True)
    run = ensure_trained_run(args.run, args.out, "mnist-fast-short", ["--epochs=0.2", "--no-report"],
                             recipe="mnist-fast")
    image = args.out / "digit.png"
    if not image.exists():
        import numpy as np
        from PIL import Image
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(image)
    print(hardware_line(), flush=True)
    cmds = commands(run, image)
    times = {(c, t): [] for c in cmds for t in trees}
    for _ in range(args.runs):
        for t in trees:
            for name, argv in cmds.items():
                times[name, t].append(time_once(argv, t))
    rows = []
    for name in cmds:
        first = statistics.median(times[name, trees[0]])
        for i, t in enumerate(trees):
            med = statistics.median(times[name, t])
            rows.append([name, "this tree" if i == 0 else str(t), len(times[name, t]), f"{med:.2f} s",
                         value_range(times[name, t], "{:.2f}", " s"), f"{med / first:.2f}"])
    print_table(["command", "cnnlab", "runs", "median", "min-max", "x this tree"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
