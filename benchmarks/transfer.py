"""Transfer learning: does ``--init-from`` beat training from scratch on a small set of new classes?

    python benchmarks/transfer.py --data-dir ../shared/data                  # the full comparison (long)
    python benchmarks/transfer.py --source-steps 5 --target-steps 5 --seeds 1 --timm-steps 1   # a smoke run

1. Source: train a recipe's model (default ``cifar10-fast``, airbench) on CIFAR-10's first five classes
   (airplane .. deer, all 25,000 training images).
2. Target: the other five classes (dog .. truck) with only ``--per-class`` training images each (the first ones
   of each class in the training file), tested on all 5,000 of their test images. For each seed, train the same
   model for the same number of steps twice: started from the source run (``init_from``; the classifier is new,
   since the classes differ) and from scratch. Both arms use the recipe's settings with ``--target-batch``
   (the learning rate scaled linearly with the batch size).
3. One ``timm:resnet18`` training step at 224 px (AdamW, fp32, channels_last): samples/s and the fraction of
   this CPU's fp32 peak (``cnnlab.bench.peak_flops``) it reaches.

Wall times are measured around each in-process ``fit`` (data already in memory; model build, training and the
final test evaluation included). Needs CIFAR-10 (set CNNLAB_DATA or --data-dir); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import hardware_line, print_table, value_range  # noqa: E402

from cnnlab.config import load_recipe, make_config  # noqa: E402
from cnnlab.data import ArrayDataset, load_dataset  # noqa: E402

SOURCE, TARGET = range(0, 5), range(5, 10)


def subset(ds: ArrayDataset, classes: range, per_class: int | None = None) -> ArrayDataset:
    """The images of ``classes`` (the first ``per_class`` of each, in file order), labels renumbered from 0."""
    keep = []
    for c in classes:
        idx = (ds.labels == c).nonzero().flatten()
        keep.append(idx[:per_class] if per_class else idx)
    idx = torch.cat(keep).sort().values
    labels = ds.labels[idx] - classes.start
    names = tuple(ds.info.class_names[c] for c in classes)
    info = replace(ds.info, num_classes=len(classes), class_names=names)
    return ArrayDataset(images=ds.images[idx].contiguous(), labels=labels, info=info, split=ds.split)


def train(values: dict, model_dir: Path, train_set: ArrayDataset, test_set: ArrayDataset) -> tuple[float, float]:
    """Fit a config in a fresh ``model_dir``; returns (test accuracy, wall seconds)."""
    from cnnlab.train import fit

    shutil.rmtree(model_dir, ignore_errors=True)
    config = make_config(values)
    t = time.perf_counter()
    result = fit(config, model_dir, train_set=train_set, test_set=test_set, log=lambda *a: None, progress=False)
    return result.test.accuracy, time.perf_counter() - t


def time_timm_step(steps: int, batch_size: int) -> dict:
    """Samples/s of ``timm:resnet18`` training steps at 224 px, and the share of the CPU's fp32 peak."""
    from cnnlab.bench import forward_flops, peak_flops
    from cnnlab.models import create_model

    torch.manual_seed(0)
    model = create_model("timm:resnet18", num_classes=1000, in_chans=3, img_size=224)
    flops = 3 * forward_flops(model, (3, 224, 224))  # backward ~ 2x forward
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch_size,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: oneDNN primitive creation, first touch of the buffers
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    peak = peak_flops(torch.float32)["flops"]
    return {"samples_per_s": batch_size / sec, "step_s": sec, "gflop_per_sample": flops / 1e9,
            "share_of_peak": flops * batch_size / sec / peak, "peak_gflops": peak / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="cifar10-fast", help="model and settings of every run")
    ap.add_argument("--source-steps", type=int, default=0, help="source training steps (0: the recipe's length)")
    ap.add_argument("--target-steps", type=int, default=200, help="steps of each target run (both arms)")
    ap.add_argument("--target-batch", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=100, help="target training images per class")
    ap.add_argument("--seeds", type=int, default=3, help="target runs per arm, seeds 0..seeds-1")
    ap.add_argument("--freeze-steps", type=int, default=0, help="fine-tuned arm: head-only steps first")
    ap.add_argument("--backbone-lr-mult", type=float, default=1.0, help="fine-tuned arm: backbone lr multiple")
    ap.add_argument("--timm-steps", type=int, default=5, help="timed timm:resnet18 steps at 224 px (0: skip)")
    ap.add_argument("--timm-batch", type=int, default=32)
    ap.add_argument("--out", default="bench-out/transfer")
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    if args.data_dir:
        os.environ["CNNLAB_DATA"] = args.data_dir
    out = Path(args.out)
    print(hardware_line(), flush=True)

    train_all, test_all = load_dataset("cifar10", "train"), load_dataset("cifar10", "test")
    base = {k: v for k, v in load_recipe(args.recipe).values.items()}
    source = {**base, "ckpt_every": 10 ** 9}
    if args.source_steps:
        source.update(steps=args.source_steps, epochs=0.0)
    src_train, src_test = subset(train_all, SOURCE), subset(test_all, SOURCE)
    acc, wall = train(source, out / "source", src_train, src_test)
    print(f"source: {args.recipe} on {', '.join(src_train.info.class_names)} ({len(src_train)} images): "
          f"test accuracy {acc:.2%} in {wall:.0f} s", flush=True)

    tgt_train, tgt_test = subset(train_all, TARGET, args.per_class), subset(test_all, TARGET)
    lr = base.get("lr", 1e-3) * args.target_batch / base.get("batch_size", 100)
    target = {**base, "steps": args.target_steps, "epochs": 0.0, "batch_size": args.target_batch, "lr": lr,
              "ckpt_every": 10 ** 9, "eval_batch_size": min(1000, base.get("eval_batch_size", 1000))}
    tuned = {**target, "init_from": str(out / "source"), "freeze_steps": args.freeze_steps,
             "backbone_lr_mult": args.backbone_lr_mult}
    results: dict[str, list[tuple[float, float]]] = {"init-from source": [], "from scratch": []}
    for seed in range(args.seeds):
        for arm, values in (("init-from source", tuned), ("from scratch", target)):
            res = train({**values, "seed": seed}, out / f"{arm.split()[0]}-s{seed}", tgt_train, tgt_test)
            results[arm].append(res)
            print(f"seed {seed} {arm}: {res[0]:.2%} in {res[1]:.0f} s", flush=True)
    rows = [[arm, len(r), f"{statistics.mean(a for a, _ in r):.2%}",
             value_range((a * 100 for a, _ in r), "{:.1f}", "%"), f"{statistics.median(w for _, w in r):.0f} s"]
            for arm, r in results.items()]
    print(f"\ntarget: {', '.join(tgt_train.info.class_names)}, {args.per_class} training images per class, "
          f"{args.target_steps} steps of {args.target_batch}, tested on {len(tgt_test)} images")
    print_table(["start", "runs", "mean test accuracy", "range", "median wall"], rows)

    if args.timm_steps:
        t = time_timm_step(args.timm_steps, args.timm_batch)
        print(f"\ntimm:resnet18 training at 224 px, batch {args.timm_batch}, fp32 channels_last, AdamW: "
              f"{t['samples_per_s']:.1f} samples/s (median of {args.timm_steps} steps, {t['step_s']:.2f} s/step); "
              f"{t['gflop_per_sample']:.1f} GFLOP per sample = {t['share_of_peak']:.0%} of this CPU's fp32 peak "
              f"({t['peak_gflops']:.0f} GFLOP/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
