"""Export a trained run to ONNX, with the preprocessing recorded in the file and a parity check.

The ONNX graph is the model alone: input ``image`` float [N, C, H, W] in [0, 1] at the model's input size,
output ``logits`` [N, num_classes], with a dynamic batch axis. What a caller must do before it (the run's
recorded `Preprocess`: resize to the training images' size, polarity, uint8 / 255, the recorded centre crop) is
written into the file's ``metadata_props`` together with the class names, so the file can be served without
cnnlab. The graph computes in fp32 whatever precision the run trained in.

Before the file is written, onnxruntime runs it on a batch of sample images and its logits are compared with
PyTorch's; a difference above the tolerance raises `CnnlabError` and nothing is written.

    result = export_onnx("runs/lenet5-mnist")        # -> runs/lenet5-mnist/model.onnx
    print(result.path, result.max_abs_diff)
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import CnnlabError, DataError
from .extras import require_extra
from .infer import TrainedModel, load_trained, to_input
from .io import atomic_write_bytes
from .preprocess import Preprocess, flexible_size
from .rundir import check_not_protected

DEFAULT_TOLERANCE = 1e-4  # max abs difference of logits, fp32 on CPU differs by ~1e-6 in practice
_NEEDED = ("onnx", "onnxruntime", "onnxscript")  # onnxscript: torch's exporter (dynamo=True) builds the graph with it


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float  # between PyTorch and onnxruntime logits over all sample batches
    n_samples: int
    batch_sizes: tuple[int, ...]  # the batch sizes checked (more than one shows the batch axis is dynamic)
    seconds: float


def require_onnx() -> None:
    """Raise a one-line `CnnlabError` naming the missing packages when the 'export' extra is not installed."""
    require_extra({name: name for name in _NEEDED}, "export", "ONNX export")


def sample_images(trained: TrainedModel, n: int = 16, data_dir: str | None = None, seed: int = 0) -> torch.Tensor:
    """uint8 [n, C, H, W] images to compare the two runtimes on: the run's own test images when they can be
    found on disk (no download), else smooth random images of the training shape (blobs, not white noise,
    so activations are in the range real inputs reach)."""
    if trained.dataset:
        from .data import load_dataset

        try:
            ds = load_dataset(trained.dataset, "test", data_dir=data_dir, download=False)
            if len(ds) and tuple(ds.images.shape[1:]) == tuple(trained.data_shape):
                return ds.images[:n].clone()
        except CnnlabError:
            pass
    g = torch.Generator().manual_seed(seed)
    c, h, w = trained.data_shape
    coarse = torch.rand(n, c, max(1, h // 4), max(1, w // 4), generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (smooth * 255).round().to(torch.uint8)


def _to_onnx_bytes(model: torch.nn.Module, example: torch.Tensor, opset: int) -> bytes:
    """Serialise ``model`` with torch's exporter; the batch axis of input and output is symbolic."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    quiet = logging.getLogger("torch.onnx")  # it warns that torchvision's ops cannot be registered: irrelevant here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(model, (example,), input_names=["image"], output_names=["logits"],
                                        dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                                        verbose=False, optimize=True)
    finally:
        quiet.setLevel(level)
    return program.model_proto.SerializeToString()


def _with_metadata(onnx_bytes: bytes, props: dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    proto.doc_string = f"cnnlab {__version__}: {props['model']} trained on {props['dataset'] or 'unknown data'}"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def describe_preprocessing(p: Preprocess) -> str:
    """One line saying what to do to an image file before the graph, from the run's record."""
    size = "x".join(map(str, p.size))
    resize = f"resize to {size}" if p.resize == "stretch" else f"shorter side to {size}, centre crop"
    steps = [f"{'grayscale' if p.channels == 1 else 'RGB'}", f"{resize} ({p.interpolation})",
             {"auto": "invert if the border is light", "yes": "invert", "no": "no inversion"}[p.invert],
             "uint8 /255"]
    if p.crop:
        steps.append(f"centre crop {'x'.join(map(str, p.crop))}")
    return ", ".join(steps)


def metadata(trained: TrainedModel) -> dict[str, str]:
    """The ``metadata_props`` written into the ONNX file (all values are strings, as ONNX requires)."""
    meta = trained.model.meta
    return {
        "model": meta.name,
        "model_args": json.dumps(meta.args),
        "classes": json.dumps(trained.classes),
        "input_size": json.dumps(list(meta.input_size)),  # (C, H, W) the graph takes
        "data_shape": json.dumps(list(trained.data_shape)),  # (C, H, W) of the training images
        "input_range": "[0, 1]",
        "preprocessing": describe_preprocessing(trained.preprocess),
        "preprocess": json.dumps(trained.preprocess.to_json()),  # the record itself, machine-readable
        "precision": trained.precision,  # what the run trained and evaluates in; the graph is fp32
        # test-time augmentation the run evaluates with ('none', 'flip', ...); not part of the graph
        "tta": str(trained.config.get("tta", "none")),
        "dataset": trained.dataset,
        "step": str(trained.step),
        "cnnlab_version": __version__,
    }


def check_parity(onnx_bytes: bytes, model: torch.nn.Module, inputs: list[torch.Tensor]) -> float:
    """Max abs difference between PyTorch and onnxruntime logits over batches of float inputs [N,C,H,W]."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            want = model(x).float().numpy()
            got = session.run(["logits"], {"image": x.numpy()})[0]
            if got.shape != want.shape:
                raise CnnlabError(f"ONNX output shape {got.shape} differs from PyTorch's {want.shape}")
            diff = float(np.max(np.abs(got - want))) if want.size else 0.0
            worst = max(worst, diff if np.isfinite(diff) else float("inf"))
    return worst


def export_onnx(run: str | Path, out: str | Path | None = None, *, tolerance: float = DEFAULT_TOLERANCE,
                opset: int = 18, n_samples: int = 16, data_dir: str | None = None) -> ExportResult:
    """Export the newest checkpoint of a run (or a checkpoint file) to ONNX and check it against PyTorch.

    Args:
        run: Run directory or checkpoint file.
        out: Output file; default ``model.onnx`` in the run directory (or the checkpoint's name with .onnx).
        tolerance: Largest allowed max-abs-difference of logits between PyTorch and onnxruntime.
        opset: ONNX opset version.
        n_samples: Sample images for the parity check (checked as one batch and as a batch of one).
        data_dir: Where to look for the run's dataset for sample images.

    Raises:
        CnnlabError: The ONNX packages are missing, export failed, or parity is worse than ``tolerance``
            (then nothing is written).
    """
    require_onnx()
    t0 = time.perf_counter()
    trained = load_trained(run, "cpu")
    if out is None:
        out = trained.path.with_suffix(".onnx") if Path(run).is_file() else Path(run) / "model.onnx"
    out = Path(out)
    check_not_protected(out, own=("*.onnx",))  # never write ONNX over a checkpoint or a run's records
    if out.exists() and out.resolve() == trained.path.resolve():
        raise CnnlabError(f"refusing to write over {out}: it is the checkpoint being exported; choose another --out")
    if not out.parent.is_dir():
        raise DataError(f"output folder does not exist: {out.parent}")
    model = trained.model.float().to(memory_format=torch.contiguous_format).eval()
    u8 = sample_images(trained, max(2, n_samples), data_dir)
    # what the ONNX graph takes: float [N,C,H,W] in [0,1] at the model's input size (after the recorded crop)
    x = to_input(u8, model.meta.input_size, crop=trained.preprocess.crop, flexible=flexible_size(model.meta),
                 name=model.meta.name)
    try:
        raw = _to_onnx_bytes(model, x[:2], opset)
    except Exception as e:  # the exporter raises many types; a failure here is one line for the user
        raise CnnlabError(f"ONNX export of {model.meta.name} failed: {type(e).__name__}: {str(e)[:200]}") from None
    data = _with_metadata(raw, metadata(trained))
    batches = [x, x[:1]]  # the full batch and a batch of one: both must work with one graph
    diff = check_parity(data, model, batches)
    if not diff <= tolerance:
        raise CnnlabError(f"ONNX parity check failed: max abs difference of logits {diff:.3g} > tolerance "
                          f"{tolerance:g} over {len(x)} sample images; nothing written")
    atomic_write_bytes(out, data)
    return ExportResult(path=out, max_abs_diff=diff, n_samples=len(x), batch_sizes=tuple(len(b) for b in batches),
                        seconds=time.perf_counter() - t0)
