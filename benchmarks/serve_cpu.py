"""CPU cost per request of `cnnlab serve`: CPU-seconds the server process spends per 1,000 ApacheBench requests.

    python benchmarks/serve_cpu.py                            # trains a small lenet5 run first (needs MNIST)
    python benchmarks/serve_cpu.py --run-dir runs/lenet5-mnist --rounds 5
    python benchmarks/serve_cpu.py --baseline-src ../old/src  # also an older tree's server, rounds interleaved

Requests per second measure the server and whatever else the machine is doing; the CPU time the server process
is charged (user + system, all its threads, from /proc/PID/stat) for a fixed number of requests depends much
less on other load, so it compares two versions of the server on a busy machine. Each round runs
``ab -k -n N -c C -p digit.png -T image/png URL/predict`` (as benchmarks/serve_ab.py, after one uncounted
warm-up round per server) and reads the server's CPU time just before and after. The mean batch of the
round's forward passes is printed beside it: a busier machine makes larger batches, which cost less per image,
so two servers are compared in alternating rounds on the same machine. Linux only (reads /proc).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import hardware_line, print_json, print_table
from serve_ab import (
    ab_missing,
    ab_parser,
    check_ab_args,
    digit_png,
    ensure_run,
    event_loop,
    run_ab,
    source_trees,
    tree_env,
)

from cnnlab.serve.server import serve_process

TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of process ``pid`` (all its threads, finished ones too), or of its thread ``thread``
    alone (a thread id: the main thread's is ``pid``), in seconds."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime, stime: fields 14 and 15 of stat(5)


def batching(url: str) -> dict:
    """The server's batching counters from /health."""
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.load(r)["batching"]


def cpu_round(server, png: Path, args) -> dict:
    """One counted ab round: the server's CPU-seconds per 1,000 requests (all threads, and the event loop's: the
    main thread, where uvicorn runs; the rest is mostly the forward passes) and the round's mean batch."""
    before = batching(server.url)
    cpu0, loop0 = cpu_seconds(server.pid), cpu_seconds(server.pid, server.pid)
    ab = run_ab(server.url, png, args.requests, args.concurrency, args.timeout)
    cpu, loop = cpu_seconds(server.pid) - cpu0, cpu_seconds(server.pid, server.pid) - loop0
    after = batching(server.url)
    passes = after["forward_passes"] - before["forward_passes"]
    return {"cpu_s_per_1000": 1000 * cpu / max(1, ab["complete"]), "cpu_s": cpu,
            "loop_s_per_1000": 1000 * loop / max(1, ab["complete"]),
            "mean_batch": (after["images"] - before["images"]) / max(1, passes), **ab}


def summary(results: list[dict], label: str) -> dict:
    """Median, min and max CPU-seconds per 1,000 requests of one server's rounds, and its failure totals."""
    mine = [r["cpu_s_per_1000"] for r in results if r["server"] == label]
    rows = [r for r in results if r["server"] == label]
    return {"server": label, "rounds": len(mine), "cpu_s_per_1000": float(np.median(mine)), "min": min(mine),
            "max": max(mine), "loop_s_per_1000": float(np.median([r["loop_s_per_1000"] for r in rows])),
            "mean_batch": float(np.median([r["mean_batch"] for r in rows])),
            "failed": sum(r["failed"] for r in rows), "non_2xx": sum(r["non_2xx"] for r in rows)}


def main() -> int:
    ap = ab_parser(__doc__, rounds=5)
    args = ap.parse_args()
    check_ab_args(ap, args)
    if not sys.platform.startswith("linux"):
        print("serve_cpu: skipped: reads the server's CPU time from /proc (Linux only)")
        return 0
    if ab_missing("serve_cpu"):
        return 0
    trees = source_trees(ap, args)

    run = ensure_run(args.run_dir, Path(args.out))
    results: list[dict] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "digit.png"
        png.write_bytes(digit_png())
        servers = {}
        for label, src in trees.items():
            servers[label] = stack.enter_context(serve_process(run, "--max-batch", str(args.max_batch),
                                                               "--max-wait-ms", str(args.max_wait_ms),
                                                               env=tree_env(src)))
            run_ab(servers[label].url, png, min(args.requests, 500), args.concurrency, args.timeout)  # warm-up
        # Both servers stay up and take turns, so they see the same spells of machine load.
        for i in range(args.rounds):
            for label, server in servers.items():
                results.append({"server": label, "round": i + 1, **cpu_round(server, png, args)})

    print(hardware_line())
    print(f"server: lenet5 run {run}; max batch {args.max_batch}, wait {args.max_wait_ms:g} ms; event loop "
          f"{event_loop()}; client: ab -k "
          f"-n {args.requests} -c {args.concurrency}, one MNIST PNG, loopback; client and server share the machine")
    print_table(["server", "round", "CPU s / 1000 req", "event loop's", "mean batch", "requests/s", "failed",
                 "non-2xx"],
                [[r["server"], r["round"], f"{r['cpu_s_per_1000']:.3f}", f"{r['loop_s_per_1000']:.3f}",
                  f"{r['mean_batch']:.1f}", f"{r['rps']:.0f}", r["failed"], r["non_2xx"]] for r in results])
    summaries = [summary(results, label) for label in servers]
    for s in summaries:
        print(f"{s['server']}: CPU-seconds per 1,000 requests, median of {s['rounds']} rounds "
              f"{s['cpu_s_per_1000']:.3f} (min {s['min']:.3f}, max {s['max']:.3f}), of which the event loop's thread "
              f"{s['loop_s_per_1000']:.3f}; median mean batch "
              f"{s['mean_batch']:.1f}; "
              f"failed {s['failed']}, non-2xx {s['non_2xx']}")
    if args.baseline_src:
        cur, base = summaries
        print(f"current / baseline: CPU per request x{cur['cpu_s_per_1000'] / base['cpu_s_per_1000']:.2f} "
              f"(same machine, alternating rounds)")
    if args.json:
        print_json({"requests": args.requests, "concurrency": args.concurrency, "rounds": results,
                    "summary": summaries})
    return 1 if any(s["failed"] or s["non_2xx"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
