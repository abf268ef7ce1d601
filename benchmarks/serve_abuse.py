"""The server under an abuse mix: does its memory stay bounded and does /health keep answering?

    python benchmarks/serve_abuse.py                         # trains a tiny lenet5 run first (needs MNIST)
    python benchmarks/serve_abuse.py --run-dir runs/lenet5-mnist --seconds 60

`cnnlab serve` runs as its own process on 127.0.0.1 and a free port, with its default limits. While a probe
thread asks /health every 0.2 s and a sampler reads the server's resident memory (/proc/PID/status) every
0.05 s, clients send at once:
  * pixel amplification: JSON bodies of 40 one-bit 5000x5000 PNGs (a few KB each), and single 25-megapixel
    RGB PNGs and a 16383x1500 WebP that pass the per-request check and so test the in-flight budget;
  * slow clients: 1,100 connections that send half a request head and then nothing;
  * deep JSON: a body nested 200,000 levels.
It prints the idle and peak RSS, the peak over idle, the /health latencies and failures, and the status codes
each kind of request got. Client and server share this machine, so the figures are for both together.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import resource
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_trained_run, hardware_line

from cnnlab.serve.server import serve_process

HOST = "127.0.0.1"  # loopback only


def ensure_run(run_dir: str | None, out: Path) -> Path:
    """The given run, or a tiny lenet5 run (20 steps: accuracy does not matter here) trained once under ``out``."""
    return ensure_trained_run(run_dir, out, "lenet5-tiny", ["--steps=20", "--ckpt_every=20", "--log_every=10"])


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (0 once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def post(port: int, body: bytes, kind: str, timeout: float) -> int:
    """Status of one POST /predict, or 0 when the connection failed or timed out."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": kind})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


class Probe(threading.Thread):
    """Asks /health every ``every`` s; keeps latencies (ms) and failures."""

    def __init__(self, port: int, every: float = 0.2, timeout: float = 5.0):
        super().__init__(daemon=True)
        self.port, self.every, self.timeout, self.latencies, self.failures = port, every, timeout, [], 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            try:
                conn.request("GET", "/health")
                ok = conn.getresponse().status == 200
            except (OSError, http.client.HTTPException):
                ok = False
            finally:
                conn.close()
            if ok:
                self.latencies.append((time.perf_counter() - t0) * 1000)
            else:
                self.failures += 1
            self.stop.wait(self.every)


class Sampler(threading.Thread):
    """Samples the server's RSS every ``every`` s; keeps the peak."""

    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self.stop.wait(self.every)


def half_open(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that each send half a request head and then nothing (the server may close them)."""
    socks = []
    for _ in range(n):
        try:
            s = socket.create_connection((HOST, port), timeout=5)
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n")
            socks.append(s)
        except OSError:
            pass
    return socks


@dataclass
class AbuseResult:
    """What one abuse run saw; `as_dict` is the --json output."""

    run: str
    seconds: float
    clients: int
    half_open: int
    half_open_held: int
    server_nofile: int
    idle_mb: float
    peak_mb: float
    health_answers: int
    health_failures: int
    health_ms: list[float]
    too_many_open_files: int
    statuses: dict[str, dict[str, int]]

    @property
    def peak_over_idle_mb(self) -> float:
        return self.peak_mb - self.idle_mb

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "health_ms"}
        lat = np.array(self.health_ms) if self.health_ms else np.array([float("nan")])
        d.update(peak_over_idle_mb=round(self.peak_over_idle_mb, 1), health_p50_ms=float(np.percentile(lat, 50)),
                 health_max_ms=float(lat.max()), host=hardware_line())
        return d


def payloads() -> dict[str, tuple[bytes, str]]:
    """The abuse mix: (body, content type) by name."""
    bomb = base64.b64encode(encoded(Image.new("1", (5000, 5000)), "PNG")).decode()
    return {
        "40 x 25 MP in one JSON": (json.dumps({"images": [bomb] * 40}).encode(), "application/json"),
        "25 MP RGB PNG": (encoded(Image.new("RGB", (5000, 5000), (9, 9, 9)), "PNG"), "image/png"),
        "16383x1500 WebP": (encoded(Image.new("RGB", (16383, 1500)), "WEBP"), "image/webp"),
        "JSON 200,000 deep": (b"[" * 200_000 + b"]" * 200_000, "application/json"),
    }


def run_abuse(run: Path, seconds: float, clients: int, n_half_open: int, server_nofile: int,
              health_timeout: float = 5.0) -> AbuseResult:
    """Serve ``run`` in a subprocess with its default limits and throw the abuse mix at it for ``seconds``.

    Raises:
        RuntimeError: the server did not start (its log's tail is in the message).
    """
    bodies = payloads()
    # The open-file limit is set as soon as the child exists, long before it listens (importing torch takes seconds).
    with serve_process(run, on_spawn=lambda proc: _limit_files(proc.pid, server_nofile)) as server:
        port = urlsplit(server.url).port
        time.sleep(1.0)
        idle = rss_mb(server.pid)
        probe, sampler = Probe(port, timeout=health_timeout), Sampler(server.pid)
        probe.start()
        sampler.start()
        statuses: dict[str, Counter] = {name: Counter() for name in bodies}
        socks = half_open(port, n_half_open)
        end = time.monotonic() + seconds  # from when the slow connections are all open

        def client(i: int) -> None:
            names = list(bodies)
            k = i
            while time.monotonic() < end:
                name = names[k % len(names)]
                k += 1
                statuses[name][post(port, *bodies[name], timeout=60)] += 1

        try:
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(client, range(clients)))
            held = sum(1 for s in socks if _still_open(s))
        finally:
            for s in socks:
                s.close()
            probe.stop.set()
            sampler.stop.set()
            probe.join()
            sampler.join()
    log_text = server.log()  # all of it: the server has stopped
    return AbuseResult(
        run=str(run), seconds=seconds, clients=clients, half_open=len(socks), half_open_held=held,
        server_nofile=server_nofile, idle_mb=idle, peak_mb=sampler.peak, health_answers=len(probe.latencies),
        health_failures=probe.failures, health_ms=probe.latencies,
        too_many_open_files=log_text.count("Too many open files"),
        statuses={name: {str(code or "conn-error"): n for code, n in sorted(c.items())}
                  for name, c in statuses.items()})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="trained run to serve (default: train a tiny lenet5 run first)")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the abuse lasts")
    ap.add_argument("--clients", type=int, default=16, help="threads sending image requests")
    ap.add_argument("--half-open", type=int, default=1100, help="slow connections held open")
    ap.add_argument("--server-nofile", type=int, default=1024,
                    help="the server's open-file limit (1024, a common default, is below --half-open)")
    ap.add_argument("--health-timeout", type=float, default=5.0, help="seconds a /health probe may take")
    ap.add_argument("--out", default="bench-out/serve-abuse", help="where the tiny run is trained")
    ap.add_argument("--data-dir", help="dataset root (else $CNNLAB_DATA, ~/.cache/cnnlab)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    if args.data_dir:
        os.environ["CNNLAB_DATA"] = args.data_dir

    run = ensure_run(args.run_dir, Path(args.out))
    try:
        r = run_abuse(run, args.seconds, args.clients, args.half_open, args.server_nofile, args.health_timeout)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r.as_dict()))
        return 0
    d = r.as_dict()
    print(d["host"])
    print(f"server: cnnlab serve {run} (default limits, open-file limit {r.server_nofile}); "
          f"{r.clients} client threads for {r.seconds:g} s, "
          f"{r.half_open} half-open connections ({r.half_open_held} still open at the end); loopback, shared machine")
    print(f"server RSS: idle {r.idle_mb:.0f} MB, peak {r.peak_mb:.0f} MB, peak over idle {r.peak_over_idle_mb:.0f} MB")
    print(f"/health: {r.health_answers} answers, {r.health_failures} failures; latency ms p50 "
          f"{d['health_p50_ms']:.1f}  max {d['health_max_ms']:.1f}")
    print(f"server log: {r.too_many_open_files} 'Too many open files' lines")
    for name, counts in r.statuses.items():
        print(f"  {name:<24} " + "  ".join(f"{code}: {n}" for code, n in counts.items()))
    return 0


def _limit_files(pid: int, n: int) -> None:
    """Process ``pid`` may open at most ``n`` files (its soft limit; Linux)."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (n if hard == resource.RLIM_INFINITY else min(n, hard), hard))


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
