"""The ``folder:`` pipeline: decode speed serial vs parallel (and Keras), first vs later passes, peak memory.

Builds a JPEG folder from CIFAR-10's real images (no download: the python batches must be on disk) upscaled to
320x256, plus a few phone-sized 4000x3000 JPEGs, then measures, each phase in a fresh process so that its peak
RSS is its own:

* decode images/s: PIL alone (open, ``draft``, resize; one thread) as the reference, then cnnlab's decode
  with one thread, and with ``workers`` threads and processes (``decode=``), straight into memory (``cache=0``);
* the first pass through the on-disk cache (decode + write);
* a later command opening the cached split (scan the folder, key, map, copy it in once), and a later epoch: every
  image served once as shuffled uint8 batches, from memory (resident) and streamed from the mapping;
* optionally Keras' ``image_dataset_from_directory`` on the same folder (``--keras-python`` naming the python of
  a venv with tensorflow-cpu, as ``vs_keras.py`` sets up);
* optionally the same load under ``torchrun --nproc-per-node 2`` (both ranks share one cache file).

Two memory modes train with ``cnnlab train`` in a child process and print its peak RSS (VmHWM, read by the
child as it exits) and accuracy:

* ``--rss-stream``: ``--count`` images (default 50,000) at 224 px, trained ``--steps`` steps with
  ``--data_memory_gb=2`` (``--budget-gb``; streamed from the cache) and then resident (``--data_memory_gb=0``);
* ``--rss-phone``: a folder whose first file is a 4000x3000 JPEG, trained at the default size (224).

Usage::

    python benchmarks/folder_pipeline.py --images 2000 --size 64 [--big 4] [--keras-python venv/bin/python [--rounds 3]]
                                         [--torchrun]
    python benchmarks/folder_pipeline.py --rss-stream [--count 50000] [--steps 100]
    python benchmarks/folder_pipeline.py --rss-phone
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
    """root/train/<class>/*.jpg: ``n`` CIFAR-10 training images at 320x256 and ``big`` 4000x3000 ones."""
    from PIL import Image

    from cnnlab.data.formats import read_cifar_batch, read_cifar_meta

    names = read_cifar_meta(cifar / "batches.meta")
    batches = [read_cifar_batch(cifar / f"data_batch_{k}") for k in range(1, 1 + min(5, -(-n // 10000)))]
    images, labels = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
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
    """One measurement, in this process: decode (serial or parallel, no cache), the first cached pass, or a
    later command (open the cached split, then one epoch of batches, resident or streamed)."""
    from cnnlab.data.folder import parse_folder_name, read_images, scan_folder

    t0 = time.perf_counter()
    opts = parse_folder_name(f"{args.root}?size={args.size}&val=0&channels=3")
    scan = scan_folder(opts)
    files = scan.splits["train"]
    if args.phase == "pil":
        touch(bare_pil([p for p, _ in files], args.size))
        seconds = time.perf_counter() - t0
        return {"phase": "pil", "images": len(files), "seconds": seconds, "images_per_s": len(files) / seconds,
                "peak_rss_mb": peak_rss_mb()}
    workers = 1 if args.phase == "serial" else args.workers
    decode = args.phase if args.phase in ("threads", "processes") else "auto"
    images, labels = read_images(files, scan.shape, scan.resize, workers=workers,
                                 cache=args.phase.startswith("cache"), decode=decode)
    row = {"phase": args.phase, "images": len(files)}
    if args.phase in ("cache-epoch", "cache-stream"):
        row.update(epoch(images, labels, stream=args.phase == "cache-stream", opened=time.perf_counter() - t0))
    else:
        touch(images)
        row["seconds"] = time.perf_counter() - t0
    row["images_per_s"] = len(files) / row["seconds"]
    return {**row, "peak_rss_mb": peak_rss_mb()}


def bare_pil(paths: list[Path], size: int) -> np.ndarray:
    """The reference: PIL alone, one thread: open, ``draft``, shorter side to ``size`` with a centre crop."""
    from PIL import Image

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            k = size / min(im.size)
            im.draft("RGB", (round(im.width * k), round(im.height * k)))
            w, h = im.size
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, box=box))
    return out


def touch(images: np.ndarray) -> int:
    """Read every byte of ``images`` (a mapped cache is read lazily) without converting it."""
    flat = np.asarray(images).reshape(len(images), -1)
    return sum(int(flat[i:i + 256].max()) for i in range(0, len(flat), 256))


def epoch(images: np.ndarray, labels: np.ndarray, stream: bool, opened: float, batch: int = 256,
          epochs: int = 5) -> dict:
    """What a later training epoch costs on the data side: every image once, as shuffled uint8 batches; the
    median of ``epochs`` epochs (one epoch of 2,000 small images takes milliseconds, so a single one mostly
    measures the first touch of freshly allocated batch buffers).

    ``BatchSource`` is what `cnnlab train` serves batches with: resident (the mapped split copied in once, timed
    as part of opening it) or streamed from the mapping (a budget far below the split's size).
    """
    import torch

    from cnnlab.data.loader import BatchSource

    t0 = time.perf_counter()
    source = BatchSource(torch.from_numpy(images), torch.from_numpy(labels), torch.device("cpu"),
                         memory_gb=1e-9 if stream else None)
    opened += time.perf_counter() - t0
    times = []
    for k in range(epochs):  # each epoch in its own order, as training's sampler draws them
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(k))
        t0 = time.perf_counter()
        served = 0
        for i in range(0, len(order), batch):
            x, _ = source.take(order[i:i + batch])
            served += x.shape[0]
        times.append(time.perf_counter() - t0)
        assert served == len(images)
    return {"seconds": float(np.median(times)), "open_seconds": opened}


def rank_load(args) -> dict:
    """Under torchrun: every rank loads the folder through the shared cache; rank 0 prints the figures."""
    from cnnlab.data import folder as folder_mod
    from cnnlab.data import load_dataset

    calls = {"n": 0}
    real = folder_mod._decode_all

    def counted(files, *a, **kw):
        calls["n"] += len(files)
        return real(files, *a, **kw)

    folder_mod._decode_all = counted  # counts the files this rank decodes: one rank should decode, the other map
    t0 = time.perf_counter()
    ds = load_dataset(f"folder:{args.root}?size={args.size}&val=0&channels=3&workers={args.workers}", "train")
    int(ds.images.sum())
    return {"rank": int(os.environ.get("RANK", "0")), "seconds": time.perf_counter() - t0, "decoded": calls["n"],
            "peak_rss_mb": peak_rss_mb()}


RSS_MODEL = "spec:in3x224x224-conv16k5s4-pool2-conv32k3-pool2-gap-fc10"  # cheap at 224 px: the data dominates
RSS_WORKER = r"""
import atexit, json, os, sys

def report():
    hwm = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
    with open(os.environ["RSS_OUT"], "w") as f:
        json.dump({"peak_rss_mb": int(hwm) / 1024}, f)

atexit.register(report)  # at exit, so the figure is this process's whole-life peak
from cnnlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_rss(dataset: str, run: Path, steps: int, *extra: str) -> dict:
    """Train ``RSS_MODEL`` on ``dataset`` in a child process; its peak RSS (MiB) and test accuracy."""
    out = run.with_suffix(".rss.json")
    cmd = [sys.executable, "-c", RSS_WORKER, "train", "--model-dir", str(run), f"--dataset={dataset}",
           f"--model={RSS_MODEL}", f"--steps={steps}", "--batch_size=64", "--optimizer=adam", "--lr=0.003",
           "--log_every=50", "--no-report", *extra]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "RSS_OUT": str(out)})
    if done.returncode != 0:
        raise SystemExit(f"training failed: {(done.stderr.strip().splitlines() or ['exit code'])[-1]}")
    results = json.loads((run / "results.json").read_text())
    return {**json.loads(out.read_text()), "accuracy": results["test"]["accuracy"], "n": results["test"]["n"]}


def rss_stream(args, tmp: Path) -> None:
    """``--count`` images at 224 px: peak RSS and accuracy streamed under ``--budget-gb``, then resident."""
    from common import hardware_line, print_table

    root = tmp / "images"
    build_folder(root, args.cifar, args.count, 0)
    dataset = f"folder:{root}?size=224&val={args.val}"
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")
    rows = []
    for label, budget in ((f"streamed, --data_memory_gb={args.budget_gb:g}", f"{args.budget_gb:g}"),
                          ("resident, --data_memory_gb=0", "0")):
        r = train_rss(dataset, tmp / f"run-{budget}", args.steps, f"--data_memory_gb={budget}")
        rows.append([label, f"{r['peak_rss_mb']:.0f}", f"{r['accuracy']:.4f}", r["n"]])
    print(hardware_line())
    print(f"folder: {args.count} CIFAR-10 images as 320x256 JPEGs, decoded to 224 px (val={args.val}), "
          f"{RSS_MODEL}, {args.steps} steps of 64")
    print_table(["training split", "peak RSS MiB", "val accuracy", "val images"], rows)


def rss_phone(args, tmp: Path) -> None:
    """A folder whose first file is a 4000x3000 JPEG, trained at the default size: the training's peak RSS."""
    from common import hardware_line, print_table

    root = tmp / "images"
    build_folder(root, args.cifar, args.count, 1)
    first = min((root / "train").rglob("*.jpg"))
    phone = next((root / "train").rglob("phone0.jpg"))
    phone.rename(first.with_name("000000-phone.jpg"))  # sorts first in the first class folder
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")
    r = train_rss(f"folder:{root}", tmp / "run", args.steps)
    print(hardware_line())
    print(f"folder: one 4000x3000 JPEG first, then {args.count} CIFAR-10 images as 320x256 JPEGs; default size; "
          f"{RSS_MODEL}, {args.steps} steps of 64")
    print_table(["run", "peak RSS MiB", "val accuracy"], [["train", f"{r['peak_rss_mb']:.0f}", f"{r['accuracy']:.4f}"]])


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
    p.add_argument("--rounds", type=int, default=1,
                   help="with --keras-python: first pass and Keras this many times, alternating (median ratio)")
    p.add_argument("--torchrun", action="store_true", help="also load under torchrun --nproc-per-node 2")
    p.add_argument("--rss-stream", action="store_true", help="peak RSS of training streamed vs resident")
    p.add_argument("--rss-phone", action="store_true", help="peak RSS of training on a folder led by a 12 MP photo")
    p.add_argument("--count", type=int, help="images for the --rss-* modes (default 50,000; --rss-phone: 200)")
    p.add_argument("--steps", type=int, default=100, help="training steps of the --rss-* modes")
    p.add_argument("--budget-gb", type=float, default=2.0, help="--rss-stream's memory budget, GiB")
    p.add_argument("--val", type=float, default=0.2, help="held-out fraction of --rss-stream (the folder default)")
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--phase", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase == "rank":  # one write per rank: two ranks' print() calls can interleave on the shared pipe
        sys.stdout.write(json.dumps(rank_load(args)) + "\n")
        sys.stdout.flush()
        return 0
    if args.phase:
        print(json.dumps(phase(args)))
        return 0

    if args.rss_stream or args.rss_phone:
        args.count = args.count or (50_000 if args.rss_stream else 200)
        with tempfile.TemporaryDirectory(prefix="folder-rss-") as tmp:
            (rss_stream if args.rss_stream else rss_phone)(args, Path(tmp))
        return 0

    from common import hardware_line, print_table

    with tempfile.TemporaryDirectory(prefix="folder-bench-") as tmp:
        root, cache = Path(tmp) / "images", Path(tmp) / "cache"
        build_folder(root, args.cifar, args.images, args.big)
        env = {"XDG_CACHE_HOME": str(cache)}
        me = [sys.executable, __file__, "--root", str(root), "--size", str(args.size), "--workers", str(args.workers)]
        rows = []
        for name in ("pil", "serial", "threads", "processes", "cache-first", "cache-epoch", "cache-stream"):
            rows += run_json([*me, "--phase", name], env)
        first_row = next(r for r in rows if r["phase"] == "cache-first")
        pairs = []  # (cnnlab first pass, Keras) images/s, alternating, each first pass into an empty cache
        for k in range(args.rounds if args.keras_python else 0):
            ours = first_row if k == 0 else run_json([*me, "--phase", "cache-first"],
                                                   {"XDG_CACHE_HOME": str(Path(tmp) / f"cache-{k}")})[0]
            keras = run_json([args.keras_python, "-c", KERAS_WORKER, str(root / "train"), str(args.size)])[0]
            pairs.append((ours["images_per_s"], keras["images_per_s"]))
            if k == 0:
                rows.append(keras)
        if args.torchrun:
            ranks = run_json([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *me[1:],
                              "--phase", "rank"], {"XDG_CACHE_HOME": str(Path(tmp) / "cache-ranks")})
            for r in ranks:
                rows.append({"phase": f"torchrun rank {r['rank']} (decoded {r['decoded']})",
                             "images": args.images + args.big,
                             "seconds": r["seconds"], "images_per_s": (args.images + args.big) / r["seconds"],
                             "peak_rss_mb": r["peak_rss_mb"]})
    print(hardware_line())
    from cnnlab.data.folder import uses_processes
    from cnnlab.data.images import decoder_versions

    first_way = "processes" if uses_processes("auto", args.images + args.big, args.workers) else "threads"
    print(f"folder: {args.images} CIFAR-10 images as 320x256 JPEGs + {args.big} at 4000x3000, to {args.size} px, "
          f"{args.workers} decoding workers; the first pass decodes in {first_way} (decode=auto)")

    print("decoders: " + ", ".join(f"{k} {v}" for k, v in decoder_versions().items()))
    names = {"pil": "PIL alone (open, draft, resize), 1 thread", "serial": "decode, 1 thread, no cache",
             "threads": f"decode, {args.workers} threads, no cache",
             "processes": f"decode, {args.workers} processes, no cache",
             "cache-first": "first pass (decode + write the cache)",
             "cache-epoch": "later epoch, resident (batches of 256, median of 5)",
             "cache-stream": "later epoch, streamed from the cache (median of 5)",
             "keras": "Keras image_dataset_from_directory (first pass)"}
    print_table(["pass", "images", "seconds", "images/s", "peak RSS MiB"],
                [[names.get(r["phase"], r["phase"]), r["images"], f"{r['seconds']:.3f}", f"{r['images_per_s']:.0f}",
                  f"{r['peak_rss_mb']:.0f}"] for r in rows])
    by = {r["phase"]: r for r in rows}
    first = by["cache-first"]["images_per_s"]
    for name in ("cache-epoch", "cache-stream"):
        r = by[name]
        print(f"{names[name]}: {r['images_per_s'] / first:.1f}x the first pass; a later command opens the cached "
              f"split (scan, key, map{', copy in' if name == 'cache-epoch' else ''}) in {r['open_seconds']:.3f} s")
    if "keras" in by:
        keras = by["keras"]["images_per_s"]
        print(f"first pass / Keras: {first / keras:.2f}x; decode / Keras: "
              f"{args.workers} threads {by['threads']['images_per_s'] / keras:.2f}x, "
              f"{args.workers} processes {by['processes']['images_per_s'] / keras:.2f}x")
    if len(pairs) > 1:
        ratios = sorted(a / b for a, b in pairs)
        print(f"first pass / Keras over {len(pairs)} alternating rounds: median {float(np.median(ratios)):.2f}x "
              f"(min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x); rounds (images/s, cnnlab vs Keras): "
              + ", ".join(f"{a:.0f} vs {b:.0f}" for a, b in pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
