"""Load test of `cnnlab serve` on loopback: N requests at a fixed concurrency, latency percentiles and throughput.

    python benchmarks/serve_load.py                          # trains a small lenet5 run first (needs MNIST)
    python benchmarks/serve_load.py --run-dir runs/lenet5-mnist --requests 2000 --concurrency 32

The server runs as its own process (``python -m cnnlab serve``) on 127.0.0.1 and a free port; the client is a
pool of threads, each with one keep-alive connection (stdlib http.client), posting PNG digits to /predict.
Every request has a timeout, the run is bounded by --requests, and the server is stopped at the end.
Client and server share this machine's CPUs, so the figures are for both together.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_trained_run, hardware_line

from cnnlab.errors import CnnlabError
from cnnlab.serve.server import serve_subprocess

HOST = "127.0.0.1"  # loopback only: a load test never targets another machine


def ensure_run(run_dir: str | None, out: Path) -> Path:
    """The given run, or a small lenet5 run trained once under ``out`` (Adam, 600 steps; ~98% on MNIST)."""
    return ensure_trained_run(run_dir, out, "lenet5-run", ["--steps=600", "--optimizer=adam", "--lr=0.002",
                                                          "--batch_size=64", "--ckpt_every=600", "--log_every=200"])


def payloads(run: Path, n: int) -> tuple[list[bytes], list[int] | None]:
    """``n`` PNG files: the run's test images when the dataset is on disk, else random blobs (no labels)."""
    from cnnlab.data import load_dataset

    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    try:
        ds = load_dataset(config.get("data", {}).get("dataset", "mnist"), "test", download=False)
        arrays = [img.numpy().transpose(1, 2, 0).squeeze(-1) if img.shape[0] == 1 else img.numpy().transpose(1, 2, 0)
                  for img in ds.images[:n]]
        labels = ds.labels[:n].tolist()
    except CnnlabError:
        rng = np.random.default_rng(0)
        arrays = [(rng.random((28, 28)) > 0.8).astype(np.uint8) * 255 for _ in range(n)]
        labels = None
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out, labels


class Client:
    """One keep-alive connection per thread."""

    def __init__(self, port: int, timeout: float):
        self.port, self.timeout = port, timeout
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        if getattr(self.local, "conn", None) is None:
            self.local.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
        return self.local.conn

    def get(self, path: str) -> dict:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def predict(self, png: bytes) -> tuple[float, int, int | None]:
        """(latency s, HTTP status or 0 for a connection error, predicted class)."""
        t0 = time.perf_counter()
        try:
            conn = self._conn()
            conn.request("POST", "/predict?top_k=1", body=png, headers={"Content-Type": "image/png"})
            resp = conn.getresponse()
            body = resp.read()
            status = resp.status
            cls = json.loads(body)["class"] if status == 200 else None
        except (OSError, http.client.HTTPException, ValueError):
            self.local.conn = None  # reconnect next time
            status, cls = 0, None
        return time.perf_counter() - t0, status, cls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="trained run to serve (default: train a small lenet5 run first)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=100, help="requests sent first and not counted")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    ap.add_argument("--out", default="bench-out/serve-load", help="where the small run is trained")
    ap.add_argument("--data-dir", help="dataset root (else $CNNLAB_DATA, ~/.cache/cnnlab)")
    args = ap.parse_args()
    if args.data_dir:
        os.environ["CNNLAB_DATA"] = args.data_dir
    if args.requests < 1 or args.concurrency < 1:
        ap.error("--requests and --concurrency must be positive")

    run = ensure_run(args.run_dir, Path(args.out))
    pngs, labels = payloads(run, 1000)
    with serve_subprocess(run, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)) as url:
        client = Client(int(url.rsplit(":", 1)[1]), args.timeout)
        health = client.get("/health")
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(client.predict, (pngs[i % len(pngs)] for i in range(args.warmup))))
            before = client.get("/health")["batching"]
            t0 = time.perf_counter()
            results = list(pool.map(client.predict, (pngs[i % len(pngs)] for i in range(args.requests))))
            wall = time.perf_counter() - t0
        after = client.get("/health")["batching"]

    lat = np.array([r[0] for r in results]) * 1000.0
    errors = sum(1 for r in results if r[1] != 200)
    passes = after["forward_passes"] - before["forward_passes"]
    images = after["images"] - before["images"]
    print(hardware_line())
    print(f"server: {health['model']} step {health['step']} ({run}); max batch {args.max_batch}, "
          f"wait {args.max_wait_ms:g} ms; client: {args.concurrency} threads, keep-alive, http.client; loopback")
    print(f"requests {args.requests}  concurrency {args.concurrency}  errors {errors}  "
          f"wall {wall:.2f} s  throughput {args.requests / wall:.0f} req/s")
    print(f"latency ms: p50 {np.percentile(lat, 50):.1f}  p90 {np.percentile(lat, 90):.1f}  "
          f"p99 {np.percentile(lat, 99):.1f}  max {lat.max():.1f}")
    print(f"batching: {passes} forward passes for {images} images (mean batch {images / max(1, passes):.1f}), "
          f"model busy {after['busy_seconds'] - before['busy_seconds']:.2f} s of {wall:.2f} s")
    if labels is not None:
        correct = sum(1 for i, r in enumerate(results) if r[2] == labels[i % len(pngs)])
        print(f"served predictions correct: {correct / len(results):.4f} (real test images)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
