"""Single-image prediction latency on CPU (target: p50 <= 2 ms for lenet5).

    python benchmarks/latency.py [--model lenet5] [--n 2000] [--runs 5]

Times the whole prediction path for one image: uint8 [1,1,28,28] -> float, fit to the model input, forward pass,
softmax (``cnnlab.infer.predict_logits``), in fresh processes with another seed each, at 1 thread and at the
default thread count. Prints p50 / p99 per run and the median over runs.
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
    import json, sys, time, torch
    from cnnlab.models import create_model
    from cnnlab.infer import predict_logits
    name, n, seed, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = create_model(name).eval()
    c, h, w = model.meta.input_size
    images = torch.randint(0, 256, (n + 100, 1, c, h, w), dtype=torch.uint8)
    times = []
    for i, img in enumerate(images):
        t = time.perf_counter()
        probs = torch.softmax(predict_logits(model, img, batch_size=1), 1)
        label = int(probs.argmax())
        if i >= 100:  # warm-up calls excluded
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    print(json.dumps({"p50": times[len(times) // 2], "p99": times[int(0.99 * len(times))],
                      "threads": torch.get_num_threads()}))
""")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--n", type=int, default=2000, help="timed calls per run")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(hardware_line(), flush=True)
    rows = []
    for threads in (1, 0):
        runs = []
        for seed in range(args.runs):
            runs.append(run_worker_json([sys.executable, "-c", WORKER, args.model, str(args.n), str(seed),
                                         str(threads)]))
        p50s = [r["p50"] for r in runs]
        rows.append([args.model, runs[0]["threads"], args.runs, f"{statistics.median(p50s):.3f} ms",
                     f"{statistics.median(r['p99'] for r in runs):.3f} ms", value_range(p50s, "{:.3f}", " ms")])
    print()
    print(f"single-image predict (uint8 image -> probabilities), {args.n} calls per run after 100 warm-up calls")
    print_table(["model", "threads", "runs", "p50 (median of runs)", "p99 (median of runs)", "p50 range"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
