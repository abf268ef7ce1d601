"""The ``folder:`` pipeline: decode speed serial vs parallel (and Keras), first vs cached pass, peak memory.

Builds a JPEG folder from CIFAR-10's real images (no download: the python batches must be on disk) upscaled to
320x256, plus a few phone-sized 4000x3000 JPEGs, then measures, each phase in a fresh process so that its peak
RSS is its own:

* decode images/s, one thread vs a thread pool (``workers=``), straight into memory (``cache=0``);
* the first pass through the on-disk cache (decode + write) and a later pass (the cache mapped and read);
* optionally Keras' ``image_dataset_from_directory`` on the same folder (``--keras-python`` naming the python of
  a venv with tensorflow-cpu, as ``vs_keras.py`` sets up);
* optionally the same load under ``torchrun --nproc-per-node 2`` (both ranks share one cache file).

Usage::

    python benchmarks/folder_pipeline.py --images 2000 --size 64 [--big 4] [--keras-python venv/bin/python] [--torchrun]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CIFAR = Path("/work/shared/data/cifar-10-batches-py")


def peak_rss_mb() -> float:
    """This process's peak resident set size, MiB.

    /proc's VmHWM belongs to this program's memory map; getrusage's ru_maxrss survives exec, so a worker would
    report its parent's peak (this script's own, after writing the 4000x3000 JPEGs).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_folder(root: Path, cifar: Path, n: int, big: int) -> None:
    """root/train/<class>/*.jpg: ``n`` CIFAR-10 images at 320x256 and ``big`` 4000x3000 ones."""
    from PIL import Image

    from cnnlab.data.formats import read_cifar_batch, read_cifar_meta

    names = read_cifar_meta(cifar / "batches.meta")
    images, labels = read_cifar_batch(cifar / "data_batch_1")
    rng = np.random.default_rng(0)
    for i in range(n):
        img = images[i % len(images)]
        img = img if img.shape[-1] == 3 else img.transpose(1, 2, 0)  # [H, W, C]
        d = root / "train" / names[int(labels[i % len(labels)])]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize((320, 256), Image.Resampling.BICUBIC).save(d / f"{i:06d}.jpg", quality=90)
    for j in range(big):
        img = images[j] if images[j].shape[-1] == 3 else images[j].transpose(1, 2, 0)
        noise = rng.integers(-12, 13, (3000, 4000, 3))  # texture, so the JPEG is photo-sized, not a flat blur
        up = np.asarray(Image.fromarray(img).resize((4000, 3000), Image.Resampling.BICUBIC), dtype=np.int16)
        d = root / "train" / names[int(labels[j])]
        Image.fromarray(np.clip(up + noise, 0, 255).astype(np.uint8)).save(d / f"phone{j}.jpg", quality=90)


def phase(args) -> dict:
    """One measurement, in this process: decode (serial or parallel, no cache) or a cached pass."""
    from cnnlab.data.folder import parse_folder_name, read_images, scan_folder

    opts = parse_folder_name(f"{args.root}?size={args.size}&val=0&channels=3")
    scan = scan_folder(opts)
    files = scan.splits["train"]
    workers = 1 if args.phase == "serial" else args.workers
    t0 = time.perf_counter()
    images, _ = read_images(files, scan.shape, scan.resize, workers=workers, cache=args.phase.startswith("cache"))
    checksum = int(np.asarray(images, dtype=np.uint64).sum())  # touch every byte (a mapped cache is lazy)
    seconds = time.perf_counter() - t0
    return {"phase": args.phase, "images": len(files), "seconds": seconds, "images_per_s": len(files) / seconds,
            "peak_rss_mb": peak_rss_mb(), "checksum": checksum}


def rank_load(args) -> dict:
    """Under torchrun: every rank loads the folder through the shared cache; rank 0 prints the figures."""
    from cnnlab.data import folder as folder_mod
    from cnnlab.data import load_dataset

    calls = {"n": 0}
    real = folder_mod.open_image

    def counted(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    folder_mod.open_image = counted  # counts this rank's decodes: one rank should decode, the other map
    t0 = time.perf_counter()
    ds = load_dataset(f"folder:{args.root}?size={args.size}&val=0&channels=3&workers={args.workers}", "train")
    int(ds.images.sum())
    return {"rank": int(os.environ.get("RANK", "0")), "seconds": time.perf_counter() - t0, "decoded": calls["n"],
            "peak_rss_mb": peak_rss_mb()}


KERAS_WORKER = r"""
import json, resource, sys, time
import tensorflow as tf
root, size = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
ds = tf.keras.utils.image_dataset_from_directory(root, image_size=(size, size), batch_size=64,
                                                 crop_to_aspect_ratio=True, shuffle=False)
n = sum(int(x.shape[0]) for x, _ in ds)
s = time.perf_counter() - t0
print(json.dumps({"phase": "keras", "images": n, "seconds": s, "images_per_s": n / s,
                  "peak_rss_mb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024}))
"""


def run_json(cmd: list[str], env: dict | None = None) -> list[dict]:
    """Run a worker; return the JSON objects of its output lines."""
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        errors = [line for line in out.stderr.splitlines() if "Error" in line or "error:" in line]
        raise SystemExit(f"worker failed: {(errors or out.stderr.strip().splitlines() or ['exit code'])[-1]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="CIFAR-10 images written as 320x256 JPEGs")
    p.add_argument("--big", type=int, default=4, help="4000x3000 JPEGs added")
    p.add_argument("--size", type=int, default=64, help="decode to this size (shorter side, centre crop)")
    p.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))))
    p.add_argument("--cifar", type=Path, default=CIFAR)
    p.add_argument("--keras-python", help="python of a venv with tensorflow-cpu: adds Keras' figures")
    p.add_argument("--torchrun", action="store_true", help="also load under torchrun --nproc-per-node 2")
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--phase", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase == "rank":
        print(json.dumps(rank_load(args)))
        return 0
    if args.phase:
        print(json.dumps(phase(args)))
        return 0

    from common import hardware_line, print_table

    with tempfile.TemporaryDirectory(prefix="folder-bench-") as tmp:
        root, cache = Path(tmp) / "images", Path(tmp) / "cache"
        build_folder(root, args.cifar, args.images, args.big)
        env = {"XDG_CACHE_HOME": str(cache)}
        me = [sys.executable, __file__, "--root", str(root), "--size", str(args.size), "--workers", str(args.workers)]
        rows = []
        for name in ("serial", "parallel", "cache-first", "cache-later"):
            rows += run_json([*me, "--phase", name], env)
        if args.keras_python:
            rows += run_json([args.keras_python, "-c", KERAS_WORKER, str(root / "train"), str(args.size)])
        if args.torchrun:
            ranks = run_json([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *me[1:],
                              "--phase", "rank"], {"XDG_CACHE_HOME": str(Path(tmp) / "cache-ranks")})
            for r in ranks:
                rows.append({"phase": f"torchrun rank {r['rank']} (decoded {r['decoded']})",
                             "images": args.images + args.big,
                             "seconds": r["seconds"], "images_per_s": (args.images + args.big) / r["seconds"],
                             "peak_rss_mb": r["peak_rss_mb"]})
    print(hardware_line())
    print(f"folder: {args.images} CIFAR-10 images as 320x256 JPEGs + {args.big} at 4000x3000, to {args.size} px, "
          f"{args.workers} decode threads")
    print_table(["pass", "images", "seconds", "images/s", "peak RSS MiB"],
                [[r["phase"], r["images"], f"{r['seconds']:.2f}", f"{r['images_per_s']:.0f}", f"{r['peak_rss_mb']:.0f}"]
                 for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
