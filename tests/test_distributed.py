"""Data-parallel training under torchrun on CPU (gloo): 2 processes x B/2 == 1 process x B, one writer, resume.

The torchrun runs are real launches (``python -m torch.distributed.run --standalone --nproc-per-node 2``) of
the unchanged ``cnnlab train`` command; each takes a few seconds on tiny data.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fakedata import write_mnist

from cnnlab import checkpoint as ck
from cnnlab.cli import main
from cnnlab.config import make_config
from cnnlab.errors import ConfigError
from cnnlab.infer import evaluate
from cnnlab.train import distributed
from cnnlab.train import loop as loop_mod
from cnnlab.train.distributed import DistContext, from_env

# lenet5 has no dropout or batch norm, and plain SGD: the 2-process run must follow the 1-process one.
ARGS = ["--recipe", "lenet5-mnist", "--batch_size=16", "--log_every=1", "--ckpt_every=3", "--eval_batch_size=16",
        "--lr=0.05", "--log_probs=0", "--no-report"]


def torchrun(run: Path, data: Path, steps: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CNNLAB_DATA": str(data), "XDG_CACHE_HOME": str(run.parent / "xdg")}
    env.pop("CNNLAB_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cnnlab", "train", "--model-dir", str(run), "--data-dir", str(data), f"--steps={steps}", *ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def weights(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = ck.load_checkpoint(ck.latest_checkpoint(run))
    return ck.section(tensors, "model")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-process run and a torchrun 2-process run of the same command, 6 steps each."""
    root = tmp_path_factory.mktemp("ddp")
    data = root / "data"
    write_mnist(data)
    one, two = root / "one", root / "two"
    assert main(["train", "--model-dir", str(one), "--data-dir", str(data), "--steps=6", *ARGS]) == 0
    proc = torchrun(two, data, 6)
    return {"data": data, "one": one, "two": two, "proc": proc}


def assert_same_curve(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), ra["step"]
        assert rb["acc"] == pytest.approx(ra["acc"], abs=1e-6), ra["step"]


def test_two_processes_follow_one_process(runs):
    one, two = records(runs["one"], "train"), records(runs["two"], "train")
    assert [r["step"] for r in one] == [1, 2, 3, 4, 5, 6]
    assert_same_curve(one, two)
    assert one[0]["loss"] != pytest.approx(one[-1]["loss"], rel=1e-2)  # it did learn: the curve is not flat
    wa, wb = weights(runs["one"]), weights(runs["two"])
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    # The sharded evaluation, gathered, scores the whole test set as one process does.
    ea, eb = records(runs["one"], "eval")[-1], records(runs["two"], "eval")[-1]
    assert eb["n"] == ea["n"] == 32 and eb["accuracy"] == ea["accuracy"]
    assert eb["loss"] == pytest.approx(ea["loss"], rel=1e-4)


def test_only_rank_zero_writes_and_prints(runs):
    two, out = runs["two"], runs["proc"].stdout
    assert sorted(p.name for p in two.iterdir()) == [".cnnlab-lock", "ckpt-00000003.safetensors",
                                                     "ckpt-00000006.safetensors", "config.json", "metrics.jsonl",
                                                     "results.json"]
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 7  # 6 train records and one eval, each written once
    assert out.count("cnnlab train: lenet5-mnist") == 1 and out.count("step 6/6") == 1 and out.count("done:") == 1
    assert json.loads((two / "results.json").read_text())["step"] == 6
    assert json.loads((two / "config.json").read_text())["processes"] == 2
    # Throughput is that of the whole group: the global batch per second.
    assert all(r["samples_per_s"] > 0 for r in records(two, "train"))


def test_resume_under_torchrun(runs):
    one, two = runs["one"], runs["two"]
    assert main(["train", "--model-dir", str(one), "--data-dir", str(runs["data"]), "--steps=9", *ARGS]) == 0
    proc = torchrun(two, runs["data"], 9)
    assert proc.stdout.count("resuming from ckpt-00000006.safetensors (step 6)") == 1
    assert "step 1/" not in proc.stdout and proc.stdout.count("step 9/9") == 1
    assert_same_curve(records(one, "train"), records(two, "train"))
    assert [r["step"] for r in records(two, "train")] == list(range(1, 10))
    assert [p.name for p in ck.list_checkpoints(two)] == [f"ckpt-0000000{i}.safetensors" for i in (3, 6, 9)]
    wa, wb = weights(one), weights(two)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


@dataclass(frozen=True)
class LoneRank(DistContext):
    """A rank of a 2-process group, run alone in this process: collectives are identities."""

    def mean(self, value):
        return value

    def barrier(self):
        pass

    def wrap(self, model):
        return model

    def check_same(self, value, what):
        pass

    def evaluate(self, model, images_u8, labels, **kw):
        return evaluate(model, images_u8, labels, **kw)


def test_each_rank_trains_on_its_rows_and_only_rank_zero_writes(tiny_data, tmp_path, monkeypatch):
    """In-process check of what each torchrun worker does: rank r trains on rows r::2 of the global batch
    the 1-process run uses at that step, and rank 1 writes nothing."""
    config = make_config({"model": "lenet5", "dataset": "mnist", "batch_size": 16, "steps": 3, "log_every": 1,
                          "ckpt_every": 3, "eval_batch_size": 32, "translate": 2})
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_step = loop_mod.train_step

    def spy(model, optimizer, x, y, **kw):
        seen.append((x.clone(), y.clone()))
        return real_step(model, optimizer, x, y, **kw)

    monkeypatch.setattr(loop_mod, "train_step", spy)
    batches = {}
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        seen.clear()
        monkeypatch.setattr(distributed, "session",
                            lambda device, r=rank, w=world: contextlib.nullcontext(LoneRank(r, w, 0, device)))
        fit_dir = tmp_path / f"rank{rank}of{world}"
        loop_mod.fit(config, fit_dir, progress=False, log=lambda *_: None)
        batches[rank, world] = list(seen)
    for step in range(3):
        x_full, y_full = batches[0, 1][step]
        for rank in (0, 1):
            x, y = batches[rank, 2][step]
            assert len(y) == 8  # half of the global batch of 16
            assert torch.equal(y, y_full[rank::2])
            torch.testing.assert_close(x, x_full[rank::2])  # same augmentation draws (translate) as 1 process
    assert (tmp_path / "rank0of2" / "results.json").is_file()
    assert list((tmp_path / "rank1of2").iterdir()) == []


def test_shard_is_distributed_sampler_dealing():
    batch = torch.arange(10)
    assert DistContext(rank=0, world_size=2).shard(batch).tolist() == [0, 2, 4, 6, 8]
    assert DistContext(rank=1, world_size=2).shard(batch).tolist() == [1, 3, 5, 7, 9]
    assert DistContext().shard(batch) is batch  # one process: the whole batch, untouched


@pytest.mark.robust
def test_bad_batch_split_and_environment(monkeypatch):
    with pytest.raises(ConfigError, match="batch_size 15 does not split evenly over 2 processes"):
        DistContext(world_size=2).check_batch_size(15)
    DistContext(world_size=2).check_batch_size(16)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="bad torchrun environment"):
        from_env()
    monkeypatch.setenv("RANK", "1")
    ctx = from_env()
    assert (ctx.rank, ctx.world_size, ctx.active, ctx.is_main) == (1, 2, True, False)
