"""One checkpoint format: a safetensors file of tensors plus a JSON header, written atomically.

Loading never unpickles anything: safetensors holds only raw tensors, and everything else (model name and
arguments, config, step, optimiser hyper-parameters) is JSON in the file's metadata. A file that is not a
valid safetensors file (a pickle, a truncated write) is refused with a `CheckpointError`.

Tensor keys: ``model/<state_dict key>``, ``ema/<key>``, ``optim/<param index>/<state key>``, ``rng/<name>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from . import io, rundir
from .checkpoint_schema import validate_checkpoint
from .errors import CheckpointError

FORMAT_VERSION = 1
BEST_NAME = "best.safetensors"  # the best evaluation's weights, kept beside the numbered checkpoints
CHOICES = ("auto", "latest", "best")  # which checkpoint a command loads, or a checkpoint file's path
_NAME = re.compile(r"^ckpt-(\d{8})\.safetensors$")


def checkpoint_path(model_dir: Path, step: int) -> Path:
    return Path(model_dir) / f"ckpt-{step:08d}.safetensors"


def list_checkpoints(model_dir: Path) -> list[Path]:
    """Checkpoints in ``model_dir``, oldest first (by step in the name)."""
    d = Path(model_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """`cnnlab.io.atomic_write_bytes` raising `CheckpointError`: a crash never leaves half a checkpoint."""
    return io.atomic_write_bytes(path, data, CheckpointError)


def _optimizer_to_flat(opt_state: dict) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (flat keys) and a JSON-able remainder."""
    tensors, scalars = {}, {}
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, pid, k = key.split("/", 2)
            state.setdefault(int(pid), {})[k] = v
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    step: int, config: dict, data: dict, ema: torch.nn.Module | None = None,
                    extra: dict | None = None) -> Path:
    """Save everything needed to resume or serve: weights, optimiser, step, RNG states, model args, config.

    Args:
        path: Target file (``ckpt-XXXXXXXX.safetensors``).
        model: The model (a `CnnModel`; its ``meta`` names the architecture and arguments).
        optimizer: Optimiser to resume, or None for a weights-only file.
        step: Number of optimisation steps done.
        config: The TrainConfig as a dict.
        data: Dataset facts the model needs at prediction time (name, class names, shape, and the
            ``preprocess`` record of `cnnlab.preprocess.Preprocess`).
        ema: Averaged copy of the model, if kept.
        extra: Other JSON-able facts a resumed run needs (the best evaluation so far, the fp16 loss scale).
    """
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema/{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    optim_meta = None
    if optimizer is not None:
        opt_tensors, optim_meta = _optimizer_to_flat(optimizer.state_dict())
        tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "model": {"name": model.meta.name, "args": model.meta.args,
                  "input_size": list(model.meta.input_size), "num_classes": model.meta.num_classes},
        "config": config,
        "data": data,
        "optimizer": optim_meta,
        "extra": extra or {},
    }
    try:
        header = json.dumps(meta)
    except TypeError as e:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {e}") from None
    atomic_write_bytes(path, st_save(tensors, metadata={"cnnlab": header}))
    return Path(path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint: (tensors, metadata). Never executes code from the file.

    Raises:
        CheckpointError: missing, not a cnnlab safetensors file (e.g. a pickle), truncated, or newer format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with rundir.utf8_path(path) as name, safe_open(name, framework="pt") as f:
            header = (f.metadata() or {}).get("cnnlab")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a valid cnnlab checkpoint ({str(e).splitlines()[0][:120]})"
                              f"{_older_hint(path)}") from None
    if header is None:
        raise CheckpointError(f"{path} is a safetensors file but not a cnnlab checkpoint (no cnnlab header)"
                              f"{_older_hint(path)}")
    try:
        meta = json.loads(header)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: JSON nested thousands of levels deep
        raise CheckpointError(f"{path}: corrupt checkpoint header{_older_hint(path)}") from None
    validate_checkpoint(meta, tensors, str(path))  # before any model is built from the header
    return tensors, meta


def _older_hint(damaged: Path) -> str:
    """For a damaged checkpoint of a run: where the run's older checkpoints are and how to use them, else ''."""
    found = list_checkpoints(damaged.parent)
    older = found[:found.index(damaged)] if damaged in found else []
    if not older:
        return ""
    return (f"; the run has {len(older)} older checkpoint(s), the newest {older[-1].name}: give it with --checkpoint, "
            "or move the damaged file away to resume training from it")


def latest_checkpoint(model_dir: Path) -> Path | None:
    """The newest checkpoint in ``model_dir``, or None."""
    found = list_checkpoints(model_dir)
    return found[-1] if found else None


def section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix/`` with the prefix removed (e.g. the model's state_dict)."""
    p = prefix + "/"
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def served_weights(tensors: dict[str, torch.Tensor], prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """The weights a checkpoint serves: its moving average (EMA) when it kept one and ``prefer_ema``, else its
    model's state_dict."""
    return (section(tensors, "ema") if prefer_ema else {}) or section(tensors, "model")


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a state_dict, refusing missing or unexpected keys and shape mismatches with one clear line."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"shape of {k} is {tuple(state[k].shape)}, model has {tuple(own[k].shape)}")
        raise CheckpointError(f"{where} does not match the model ({'; '.join(parts)})")
    module.load_state_dict(state)


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict | None, where: str) -> None:
    """Load optimiser state saved by `save_checkpoint`; tuples in param groups come back as tuples."""
    if meta is None:
        raise CheckpointError(f"{where} holds no optimiser state; cannot resume training from it")
    sd = _optimizer_from_flat(tensors, meta)
    current = optimizer.state_dict()["param_groups"]
    if len(current) != len(sd["param_groups"]):
        raise CheckpointError(f"{where}: optimiser has {len(current)} parameter groups, "
                              f"checkpoint {len(sd['param_groups'])}")
    for cur, saved in zip(current, sd["param_groups"]):
        for k, v in list(saved.items()):
            if isinstance(cur.get(k), tuple) and isinstance(v, list):
                saved[k] = tuple(v)
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{where}: optimiser state does not fit ({e})") from None


def cuda_rng_keys(keys: Iterable[str]) -> list[str]:
    """The ``rng/cudaN`` keys among ``keys`` in device order (``cuda2`` before ``cuda10``, unlike text order)."""
    found = [(int(k[len("rng/cuda"):]), k) for k in keys if re.fullmatch(r"rng/cuda\d+", k)]
    return [k for _, k in sorted(found)]


def restore_rng(tensors: dict) -> None:
    """Restore the global torch RNG states saved in the checkpoint (dropout draws depend on them)."""
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in cuda_rng_keys(tensors)]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's best checkpoint (by its ``select_metric``), or None when none was kept."""
    path = Path(run_dir) / BEST_NAME
    return path if path.is_file() else None


def choose_checkpoint(run: str | Path, which: str = "auto") -> Path:
    """The checkpoint file to load from a run directory.

    Args:
        run: A run directory, or a checkpoint file (then returned as is, whatever ``which`` says).
        which: ``auto`` (the best when the run kept one, else the newest), ``latest``, ``best``, or the
            path of a checkpoint file.

    Raises:
        CheckpointError: No such directory or file, or no checkpoint of the kind asked for.
    """
    run = Path(run)
    if run.is_file():
        return run
    if which not in CHOICES:
        path = Path(which)
        if not path.is_file():
            raise CheckpointError(f"no such checkpoint file: {which} (use latest, best or a file's path)")
        return path
    if not run.is_dir():
        raise CheckpointError(f"no such run directory or checkpoint: {run}")
    best, latest = best_checkpoint(run), latest_checkpoint(run)
    if which == "best" and best is None:
        raise CheckpointError(f"{run} has no {BEST_NAME} (runs keep one when eval_every > 0); use --checkpoint latest")
    found = latest if which == "latest" else (best or latest)
    if found is None:
        raise CheckpointError(f"no checkpoint in {run} (train first: cnnlab train --model-dir {run} ...)")
    return found
