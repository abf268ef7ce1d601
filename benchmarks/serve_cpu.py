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

    python benchmarks/serve_cpu.py --event-loop-only --baseline-src ../old/src

measures instead the event loop's own work per lean-path request, finer than a whole server's rounds can on a
busy machine: each tree's app is called in a fresh process as uvicorn would call it (a raw PNG, the body
already received), without sockets, HTTP parsing or model (the batcher answers at once with a slice of one
real batch's result), and the minimum of ``time.thread_time()`` per request over the rounds is printed, the
two trees taking turns.
"""

from __future__ import annotations

import asyncio
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


LOOP_REQUESTS = 500  # lean-path requests per --event-loop-only round


def event_loop_worker(run: str, png: str, rounds: int) -> None:
    """Print (one JSON line) the event loop's CPU microseconds per lean-path request of each round, for the app
    of the cnnlab on sys.path: no sockets, and a batcher that answers at once (see the module docstring)."""
    import time

    import torch

    from cnnlab.serve import create_app

    body = Path(png).read_bytes()
    app = create_app(run)
    batcher = app.state.batcher
    # One real batch's result (a tensor or rows, whichever this tree's forward gives): each request gets a slice.
    result = batcher.forward(torch.zeros((32, *app.state.trained.data_shape), dtype=torch.uint8))
    turn = iter(range(10**9))

    async def submit(images):
        i = next(turn) % 32
        return result[i:i + 1]

    batcher.submit = submit
    scope = {"type": "http", "method": "POST", "path": "/predict", "query_string": b"", "http_version": "1.1",
             "headers": [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())],
             "cnnlab.body_received": True}
    statuses = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def requests(n: int) -> None:
        for _ in range(n):
            await app(dict(scope), receive, send)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(requests(50))  # warm-up
    us = []
    for _ in range(rounds):
        t0 = time.thread_time()
        loop.run_until_complete(requests(LOOP_REQUESTS))
        us.append((time.thread_time() - t0) / LOOP_REQUESTS * 1e6)
    if set(statuses) != {200}:
        raise SystemExit(f"the app answered {sorted(set(statuses))}, not 200")
    print(json.dumps({"us": us}))


def event_loop_main(args, trees: dict[str, Path], run: Path, png: Path) -> int:
    """--event-loop-only: each tree's worker in turn, ``args.rounds`` times; minimum and median per tree."""
    from common import run_worker_json

    us: dict[str, list[float]] = {label: [] for label in trees}
    for _ in range(args.rounds):
        for label, src in trees.items():
            cmd = [sys.executable, __file__, "--loop-worker", str(run), str(png)]
            us[label] += run_worker_json(cmd, env=tree_env(src))["us"]
    print(hardware_line())
    print(f"event loop's CPU per lean-path request (no sockets, no model): lenet5 run {run}, one MNIST PNG, "
          f"{args.rounds} turns per tree of 5 rounds of {LOOP_REQUESTS} requests")
    best = {label: min(v) for label, v in us.items()}
    for label, v in us.items():
        print(f"{label}: min {best[label]:.1f} us, median {float(np.median(v)):.1f} us over {len(v)} rounds")
    if args.baseline_src:
        print(f"current / baseline: x{best['current'] / best['baseline']:.2f} (minimums)")
    return 0


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--loop-worker":  # a child of --event-loop-only
        event_loop_worker(sys.argv[2], sys.argv[3], 5)
        return 0
    ap = ab_parser(__doc__, rounds=5)
    ap.add_argument("--event-loop-only", action="store_true",
                    help="the event loop's work per request alone, in-process (see above); no ab")
    args = ap.parse_args()
    check_ab_args(ap, args)
    if args.event_loop_only:
        trees = source_trees(ap, args)
        run = ensure_run(args.run_dir, Path(args.out))
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "digit.png"
            png.write_bytes(digit_png())
            return event_loop_main(args, trees, run, png)
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
