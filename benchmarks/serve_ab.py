"""Throughput of `cnnlab serve` under ApacheBench: PNG digits posted to /predict by an external load generator.

    python benchmarks/serve_ab.py                            # trains a small lenet5 run first (needs MNIST)
    python benchmarks/serve_ab.py --run-dir runs/lenet5-mnist --requests 2000 --concurrency 32 --rounds 3
    python benchmarks/serve_ab.py --baseline-src ../old/src  # also an older tree's server, rounds interleaved
    python benchmarks/serve_ab.py --workers 2                # only the server of two worker processes

The server runs as its own process (``python -m cnnlab serve``) on 127.0.0.1 and a free port. One MNIST test
digit is written as a PNG and ``ab -k -n N -c C -p digit.png -T image/png URL/predict`` is run a few rounds
(after one uncounted warm-up round each time the server starts): ab is a C program with one keep-alive
connection per concurrent client, so the figures are the server's and not a Python client's. ab sends
HTTP/1.0 requests asking for keep-alive; its "Keep-Alive requests" line tells whether the server kept the
connections open. ab's -l is added: the answers' length varies by a few bytes (the last digits of the
probabilities depend on which requests shared a forward pass), which ab would otherwise count as failures;
connection errors and non-2xx answers still count. Every round is bounded by -n and by ab's own timeout
(-s), and the server is stopped at the end.

``--workers`` lists the server process counts to measure (``cnnlab serve --workers``; default 1 and 2). With
``--baseline-src`` a second server is started from that source tree (its ``src`` directory, put first on
PYTHONPATH) for each count. Several servers are measured in alternating rounds, so a machine whose load changes
affects all alike; the ratio of each one's figures to the first's is printed. Client and server share this
machine's CPUs.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_trained_run, hardware_line, print_json, print_table

from cnnlab.errors import CnnlabError
from cnnlab.serve.server import httptools_available, serve_subprocess


def ensure_run(run_dir: str | None, out: Path) -> Path:
    """The given run, or a small lenet5 run trained once under ``out`` (as benchmarks/serve_load.py trains it)."""
    return ensure_trained_run(run_dir, out, "lenet5-run", ["--steps=600", "--optimizer=adam", "--lr=0.002",
                                                          "--batch_size=64", "--ckpt_every=600", "--log_every=200"])


def digit_png() -> bytes:
    """One MNIST test digit as a PNG file (a drawn stroke when MNIST is not on disk)."""
    from cnnlab.data import load_dataset

    try:
        array = load_dataset("mnist", "test", download=False).images[0, 0].numpy()
    except CnnlabError:
        array = np.zeros((28, 28), np.uint8)
        array[5:23, 13:16] = 255  # a "1"
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def parse_ab(text: str) -> dict:
    """The figures of one ab report: requests/s, completed, failed, non-2xx, keep-alive requests, percentiles (ms).

    Raises:
        ValueError: The text is not an ab report (e.g. ab failed before it finished).
    """
    def field(name: str, default: str | None = None) -> str:
        m = re.search(rf"^{re.escape(name)}:\s+([\d.]+)", text, re.M)
        if m is None:
            if default is None:
                raise ValueError(f"ab printed no '{name}' line")
            return default
        return m.group(1)

    percentiles = {int(p): float(ms) for p, ms in re.findall(r"^\s+(\d+)%\s+(\d+)", text, re.M)}
    if 50 not in percentiles or 99 not in percentiles:
        raise ValueError("ab printed no percentile table")
    return {"rps": float(field("Requests per second")), "complete": int(field("Complete requests")),
            "failed": int(field("Failed requests")), "non_2xx": int(field("Non-2xx responses", "0")),
            "keep_alive": int(field("Keep-Alive requests", "0")), "p50_ms": percentiles[50],
            "p99_ms": percentiles[99], "max_ms": percentiles.get(100, float("nan"))}


def run_ab(url: str, png: Path, requests: int, concurrency: int, timeout_s: int) -> dict:
    """One ab round against ``url``/predict; its parsed figures."""
    cmd = ["ab", "-q", "-k", "-l", "-s", str(timeout_s), "-n", str(requests), "-c", str(concurrency), "-p", str(png),
           "-T", "image/png", f"{url}/predict"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout_s * 4 + 600)
    try:
        return parse_ab(out.stdout)
    except ValueError as e:
        tail = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:] or [f"exit code {out.returncode}"]
        raise SystemExit(f"ab failed: {e}: {tail[0]}") from None


def measure(label: str, run: Path, server: tuple[dict[str, str], list[str]], args, png: Path,
            rounds: int) -> list[dict]:
    """Start one server (its environment and extra options), warm it up with an uncounted round, and run
    ``rounds`` counted ab rounds on it."""
    env, options = server
    with serve_subprocess(run, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                          *options, env=env) as url:
        run_ab(url, png, min(args.requests, 500), args.concurrency, args.timeout)
        return [{"server": label, **run_ab(url, png, args.requests, args.concurrency, args.timeout)}
                for _ in range(rounds)]


def summary(results: list[dict], label: str) -> dict:
    """Median requests/s, p50 and p99 of one server's rounds and its totals of failures and non-2xx answers."""
    mine = [r for r in results if r["server"] == label]
    return {"server": label, "rounds": len(mine), "rps": float(np.median([r["rps"] for r in mine])),
            "p50_ms": float(np.median([r["p50_ms"] for r in mine])),
            "p99_ms": float(np.median([r["p99_ms"] for r in mine])),
            "failed": sum(r["failed"] for r in mine), "non_2xx": sum(r["non_2xx"] for r in mine),
            "keep_alive": sum(r["keep_alive"] for r in mine), "complete": sum(r["complete"] for r in mine)}


def event_loop() -> str:
    """The event loop a server started from this environment runs on (uvicorn's 'auto' choice; looked up here
    rather than asked of cnnlab, so that an older source tree's server can be measured too)."""
    found = importlib.util.find_spec("uvloop") is not None
    return "uvloop" if found else "asyncio (uvloop is not installed; it is in the 'serve' extra)"


def ab_parser(description: str, rounds: int) -> argparse.ArgumentParser:
    """The options every ApacheBench benchmark of the server takes (``rounds``: the default of --rounds)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="trained run to serve (default: train a small lenet5 run first)")
    ap.add_argument("--requests", type=int, default=2000, help="ab -n: requests per round")
    ap.add_argument("--concurrency", type=int, default=32, help="ab -c")
    ap.add_argument("--rounds", type=int, default=rounds, help="counted ab rounds per server")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--timeout", type=int, default=30, help="ab -s: seconds each response may take")
    ap.add_argument("--baseline-src", help="another tree's src directory: its server is measured in alternate rounds")
    ap.add_argument("--out", default="bench-out/serve-load", help="where the small run is trained")
    ap.add_argument("--data-dir", help="dataset root (else $CNNLAB_DATA, ~/.cache/cnnlab)")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    return ap


def check_ab_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse impossible --requests/--concurrency/--rounds (argparse's one-line error); apply --data-dir."""
    if args.data_dir:
        os.environ["CNNLAB_DATA"] = args.data_dir
    if args.requests < 1 or args.concurrency < 1 or args.rounds < 1 or args.concurrency > args.requests:
        ap.error("--requests, --concurrency and --rounds must be positive, --concurrency at most --requests")


def ab_missing(name: str) -> bool:
    """Whether ApacheBench is missing (then says so: the benchmark is skipped, not failed)."""
    if shutil.which("ab") is None:
        print(f"{name}: skipped: ApacheBench (ab) is not installed (Debian/Ubuntu: apt-get install apache2-utils)")
        return True
    return False


def source_trees(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Path]:
    """The src directories to serve from: this tree's ("current") and --baseline-src's ("baseline")."""
    trees = {"current": Path(__file__).resolve().parents[1] / "src"}
    if args.baseline_src:
        if not (Path(args.baseline_src) / "cnnlab").is_dir():
            ap.error(f"--baseline-src {args.baseline_src}: no cnnlab package there (give the tree's src directory)")
        trees["baseline"] = Path(args.baseline_src).resolve()
    return trees


def tree_env(src: Path) -> dict[str, str]:
    """The environment addition that makes a server process import cnnlab from ``src``."""
    return {"PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}


def worker_counts(ap: argparse.ArgumentParser, text: str) -> list[int]:
    """--workers: a comma-separated list of positive process counts (argparse's one-line error otherwise)."""
    try:
        counts = [int(w) for w in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or len(set(counts)) < len(counts):
        ap.error(f"--workers {text}: expected distinct positive counts, e.g. 1,2")
    return counts


def servers_to_measure(trees: dict[str, Path], workers: list[int]) -> dict[str, tuple[dict[str, str], list[str]]]:
    """Each tree with each worker count: label -> (environment, extra ``cnnlab serve`` options). One worker
    passes no option, so an older tree without --workers can be measured too."""
    servers = {}
    for tree, src in trees.items():
        for w in workers:
            label = tree if len(workers) == 1 else f"{tree}, {w} worker{'s' if w > 1 else ''}"
            servers[label] = (tree_env(src), [] if w == 1 else ["--workers", str(w)])
    return servers


def main() -> int:
    ap = ab_parser(__doc__, rounds=3)
    ap.add_argument("--workers", default="1,2",
                    help="server processes (cnnlab serve --workers); a list measures each, rounds alternating")
    args = ap.parse_args()
    check_ab_args(ap, args)
    workers = worker_counts(ap, args.workers)
    if ab_missing("serve_ab"):
        return 0
    servers = servers_to_measure(source_trees(ap, args), workers)

    run = ensure_run(args.run_dir, Path(args.out))
    results: list[dict] = []
    digit = digit_png()
    alternate = len(servers) > 1
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "digit.png"
        png.write_bytes(digit)
        # One round per server start, alternating, so the servers see the same spells of machine load.
        for _ in range(args.rounds if alternate else 1):
            for label, server in servers.items():
                results += measure(label, run, server, args, png, 1 if alternate else args.rounds)
    for label in servers:  # each server's rounds numbered 1, 2, ... in the order they ran
        for i, r in enumerate(r for r in results if r["server"] == label):
            r["round"] = i + 1

    print(hardware_line())
    if not httptools_available():
        print("note: httptools is not installed, so the server parses HTTP with h11, which closes every HTTP/1.0 "
              "connection (ab's -k asks for keep-alive): pip install httptools (it is in the 'serve' extra)")
    print(f"server: lenet5 run {run}; max batch {args.max_batch}, wait {args.max_wait_ms:g} ms; event loop "
          f"{event_loop()}; client: ab -k -n {args.requests} -c {args.concurrency}, one {len(digit)}-byte "
          f"MNIST PNG, loopback; client and server share the machine")
    print_table(["server", "round", "requests/s", "p50 ms", "p99 ms", "max ms", "failed", "non-2xx", "keep-alive"],
                [[r["server"], r["round"], f"{r['rps']:.0f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
                  f"{r['max_ms']:.0f}", r["failed"], r["non_2xx"], r["keep_alive"]] for r in results])
    summaries = [summary(results, label) for label in servers]
    for s in summaries:
        print(f"{s['server']}: median of {s['rounds']} rounds: {s['rps']:.0f} requests/s, p50 {s['p50_ms']:.0f} ms, "
              f"p99 {s['p99_ms']:.0f} ms; failed {s['failed']}, non-2xx {s['non_2xx']}, "
              f"keep-alive {s['keep_alive']} of {s['complete']}")
    first = summaries[0]
    for s in summaries[1:]:
        print(f"{s['server']} / {first['server']}: requests/s x{s['rps'] / first['rps']:.2f}, "
              f"p99 x{s['p99_ms'] / max(first['p99_ms'], 1):.2f} (same machine, alternating rounds)")
    if args.json:
        print_json({"requests": args.requests, "concurrency": args.concurrency, "rounds": results,
                    "summary": summaries})
    return 1 if any(s["failed"] or s["non_2xx"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
