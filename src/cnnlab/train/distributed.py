"""Data-parallel training across processes (PyTorch DDP), started by ``torchrun``; a no-op otherwise.

``torchrun --nproc-per-node N -m cnnlab train ...`` starts N copies of the same command with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set. Each copy:

* joins the process group (gloo on CPU, nccl on CUDA, one GPU per process: ``cuda:LOCAL_RANK``);
* builds the same model from the same seed (DDP also broadcasts rank 0's weights) and resumes from the
  same checkpoint (all ranks must see the run directory: on several machines, a shared filesystem);
* takes its share of each global batch: the batch of ``config.batch_size`` indices the 1-process run
  would use at that step (same seed, same epoch shuffle, same augmentation draws), then rows
  ``rank::world_size`` of it, as ``DistributedSampler`` deals them. With equal shards, the average of
  the per-rank mean gradients DDP computes is the full batch's mean gradient, so N processes with global
  batch B follow the 1-process run with batch B (up to float rounding; batch norm on CPU uses per-rank
  batch statistics, on CUDA it is converted to SyncBatchNorm);
* evaluates its shard of the test set; the logits are gathered so every rank gets the full result.

Only rank 0 writes files (checkpoints, config.json, metrics.jsonl, results.json) and prints; the others
wait at a barrier after each write.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..infer import EvalResult, evaluate, predict_logits


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly one-process) data-parallel run.

    Attributes:
        rank: Global rank, 0 .. world_size - 1 (0 writes files and prints).
        world_size: Number of processes.
        local_rank: Rank on this machine (picks the GPU).
        device: The device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch_size(self, batch_size: int) -> None:
        """The global batch must split into equal shards, or the averaged gradient is not the batch mean."""
        if batch_size % self.world_size:
            raise ConfigError(f"batch_size {batch_size} does not split evenly over {self.world_size} processes; "
                              f"use a multiple of {self.world_size}")

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch: ``batch[rank::world_size]`` (DistributedSampler's dealing)."""
        return batch[self.rank::self.world_size] if self.active else batch

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train: ``model`` itself, or a DistributedDataParallel around it (same parameters,
        so saving ``model`` saves the trained weights, and ``model.meta`` stays where it was)."""
        if not self.active:
            return model
        if self.device.type == "cuda":  # per-GPU batch statistics would differ from the 1-process run
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index])
        return nn.parallel.DistributedDataParallel(model)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over all ranks (the same result on every rank)."""
        if not self.active:
            return value
        out = value.detach().clone().float()
        tdist.all_reduce(out)  # SUM: gloo has no AVG
        return out / self.world_size

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def on_main(self, fn: Callable, *args, **kwargs) -> None:
        """Run ``fn(*args, **kwargs)`` on rank 0 only, then let every rank pass together."""
        if self.is_main:
            fn(*args, **kwargs)
        self.barrier()

    def check_same(self, value: int, what: str) -> None:
        """Raise on every rank if the ranks disagree on ``value`` (e.g. the step they resume from)."""
        if not self.active:
            return
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        parts = [torch.zeros_like(mine) for _ in range(self.world_size)]
        tdist.all_gather(parts, mine)
        values = [int(p.item()) for p in parts]
        if len(set(values)) > 1:
            raise CheckpointError(f"ranks disagree on the {what} ({values}); every process must see the same run "
                                  "directory (on several machines: a shared filesystem)")

    def evaluate(self, model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, **kw) -> EvalResult:
        """`cnnlab.infer.evaluate`, with the images split over the ranks and the logits gathered on every rank."""
        if not self.active:
            return evaluate(model, images_u8, labels, **kw)
        n, w = len(images_u8), self.world_size
        mine = predict_logits(model, images_u8[self.rank::w], **kw)
        width = -(-n // w)  # all_gather needs equal sizes: pad each shard to ceil(n / w) rows
        padded = torch.zeros(width, model.meta.num_classes, device=self.device)
        padded[:len(mine)] = mine.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(w)]
        tdist.all_gather(parts, padded)
        logits = torch.empty(n, model.meta.num_classes)
        for r, part in enumerate(parts):
            logits[r::w] = part[:len(range(r, n, w))].cpu()
        labels = labels.cpu()
        loss = F.cross_entropy(logits, labels).item() if n else float("nan")
        acc = (logits.argmax(1) == labels).float().mean().item() if n else float("nan")
        return EvalResult(loss=loss, accuracy=acc, n=n, logits=logits)


def from_env(device: torch.device = torch.device("cpu")) -> DistContext:
    """This process's place from torchrun's environment (one process when ``WORLD_SIZE`` is unset).

    Under several processes a CUDA device becomes ``cuda:LOCAL_RANK``.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    if world > 1 and device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) on this machine; "
                              "use --nproc-per-node <= the number of GPUs")
        device = torch.device("cuda", local)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def is_main_process() -> bool:
    """True unless this is a torchrun worker of rank > 0 (those neither print nor write)."""
    return from_env().is_main


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[DistContext]:
    """Join the process group when started by torchrun (gloo on CPU, nccl on CUDA); leave it at the end,
    also on errors. A group that was already set up by the caller is used and left alone."""
    ctx = from_env(device)
    owns = ctx.active and not tdist.is_initialized()
    if owns:
        if ctx.device.type == "cuda":
            torch.cuda.set_device(ctx.device)
        tdist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo", rank=ctx.rank,
                                 world_size=ctx.world_size)
    try:
        yield ctx
        ctx.barrier()  # finish together: rank 0 may still be writing results
    finally:
        if owns:
            tdist.destroy_process_group()
