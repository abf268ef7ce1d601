"""Export a trained run to ONNX, with the preprocessing recorded in the file and a parity check.

The ONNX graph is the model with the run's test-time augmentation: input ``image`` float [N, C, H, W] in [0, 1]
at the model's input size, output ``logits`` [N, num_classes] (for a run that evaluates with TTA, the mean of the
logits of the augmented views, as `cnnlab.infer` computes them; ``tta=False`` exports the single-view model),
with a dynamic batch axis. What a caller must do before it (the run's recorded `Preprocess`: resize to the
training images' size, polarity, uint8 / 255, the recorded centre crop) is written into the file's
``metadata_props`` together with the class names, so the file can be served without cnnlab. The graph computes
in fp32 whatever precision the run trained in.

Before the file is written, onnxruntime runs it on a batch of sample images and its logits are compared with
what `cnnlab.infer.predict_logits` (``cnnlab predict``, ``evaluate``, ``serve``) computes for the same images,
in fp32; a difference above the tolerance raises `CnnlabError` and nothing is written.

    result = export_onnx("runs/lenet5-mnist")        # -> runs/lenet5-mnist/model.onnx
    print(result.path, result.max_abs_diff)
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import CnnlabError, ConfigError, DataError
from .extras import require_extra
from .infer import TrainedModel, load_trained, predict_logits, to_input, tta_logits
from .io import atomic_write_bytes
from .preprocess import Preprocess, flexible_size
from .rundir import check_not_protected

DEFAULT_TOLERANCE = 1e-4  # max abs difference of logits, fp32 on CPU differs by ~1e-6 in practice
_NEEDED = ("onnx", "onnxruntime", "onnxscript")  # onnxscript: torch's exporter (dynamo=True) builds the graph with it

# torch's exporter builds every graph at opset 18 (its torchlib's own) and converts it to the opset asked for with
# onnxscript's / onnx's version converters. Up to 25 that works for every cnnlab model, with or without TTA (26
# fails for the models with Gelu); down from 18 it works only where the converter has an adapter for each op of
# the graph (below 15 never: none for Shape, which the dynamic batch axis needs). A failed conversion leaves the
# graph at 18 and only logs a warning, so the opset of the result is checked too.
NATIVE_OPSET = 18
MIN_OPSET, MAX_OPSET = 15, 25


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float  # between PyTorch and onnxruntime logits over all sample batches
    n_samples: int
    batch_sizes: tuple[int, ...]  # the batch sizes checked (more than one shows the batch axis is dynamic)
    seconds: float
    tta: str = "none"  # the test-time augmentation the graph computes ('none': the single-view model)
    opset: int = NATIVE_OPSET


class TtaModel(nn.Module):
    """``model`` followed by test-time augmentation: float inputs [N,C,H,W] -> logits averaged over the views
    (`cnnlab.infer.tta_logits`, the code ``predict`` and ``evaluate`` run, so the graph cannot drift from it)."""

    def __init__(self, model: nn.Module, tta: str) -> None:
        super().__init__()
        self.model = model
        self.tta = tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.model, x, self.tta)


def check_opset(opset: int) -> None:
    """Raise `ConfigError` unless ``opset`` is in the range torch's exporter can produce (`MIN_OPSET`..`MAX_OPSET`)."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"--opset {opset} is not supported: torch's ONNX exporter produces opsets {MIN_OPSET} to "
                          f"{MAX_OPSET} ({NATIVE_OPSET}, the default, and above work for every model)")


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


class _Collect(logging.Handler):
    """Keeps the log records it is given (instead of printing them)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _conversion_failure(records: list[logging.LogRecord]) -> str:
    """The converter's reason, in a few words, from its log records ('' if it gave none)."""
    for r in records:
        if r.exc_info and r.exc_info[1] is not None:
            lines = str(r.exc_info[1]).strip().splitlines() or [""]
            return lines[0].rsplit("failed: ", 1)[-1][:120]  # "...BaseConverter.h:66: ... failed: No Adapter ..."
    return ""


def onnx_opset(proto) -> int | None:
    """The default-domain (ai.onnx) opset a model imports, or None."""
    return next((i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")), None)


def _to_onnx_bytes(model: torch.nn.Module, example: torch.Tensor, opset: int) -> bytes:
    """Serialise ``model`` with torch's exporter at ``opset``; the batch axis of input and output is symbolic.

    Raises:
        CnnlabError: The graph could not be converted to ``opset`` (the exporter only logs that and returns the
            graph at its own opset; its log, a traceback among it, is kept from the user).
    """
    import onnx

    batch = torch.export.Dim("batch", min=1, max=65536)
    # torch.onnx warns that torchvision's ops cannot be registered (irrelevant here) and, below 18, that it will
    # convert; onnxscript's version converter logs a failed conversion as a warning with a full traceback.
    # Their records go to a list in place of their handlers (torch's own logger prints itself) for the call.
    collect, saved = _Collect(), []
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, logger.handlers))
        logger.handlers = [collect]
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(model, (example,), input_names=["image"], output_names=["logits"],
                                        dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                                        verbose=False, optimize=True)
    finally:
        for logger, level, propagate, handlers in saved:
            logger.handlers = handlers
            logger.setLevel(level)
            logger.propagate = propagate
    data = program.model_proto.SerializeToString()
    got = onnx_opset(onnx.load_from_string(data))
    if got != opset:
        reason = _conversion_failure(collect.records)
        if isinstance(model, TtaModel):
            name = f"{model.model.meta.name} with test-time augmentation {model.tta!r}"
        else:
            name = getattr(getattr(model, "meta", None), "name", None) or type(model).__name__
        raise CnnlabError(f"cannot export {name} at ONNX opset {opset}: the exporter builds opset {NATIVE_OPSET} and "
                          f"could not convert this graph to {opset}" + (f" ({reason})" if reason else "")
                          + f"; nothing written. Use --opset {NATIVE_OPSET} to {MAX_OPSET}")
    return data


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


def metadata(trained: TrainedModel, graph_tta: str | None = None) -> dict[str, str]:
    """The ``metadata_props`` written into the ONNX file (all values are strings, as ONNX requires).

    Args:
        trained: The run.
        graph_tta: The test-time augmentation inside the graph (default: the run's own).
    """
    graph_tta = trained.tta if graph_tta is None else graph_tta
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
        "tta": trained.tta,  # test-time augmentation the run evaluates with ('none', 'flip', ...)
        "graph_tta": graph_tta,  # what the graph computes: the run's, or 'none' when exported without it
        "dataset": trained.dataset,
        "step": str(trained.step),
        "cnnlab_version": __version__,
    }


def check_parity(onnx_bytes: bytes, cases: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Max abs difference between onnxruntime's logits and the expected ones.

    Args:
        onnx_bytes: The model.
        cases: Pairs of (graph input: float [N,C,H,W], expected logits [N, K]).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types; e.g. an opset it does not implement
        raise CnnlabError(f"onnxruntime cannot load the exported graph: {str(e).strip()[:200]}; nothing written") \
            from None
    worst = 0.0
    with torch.no_grad():
        for x, expected in cases:
            want = expected.float().numpy()
            got = session.run(["logits"], {"image": x.numpy()})[0]
            if got.shape != want.shape:
                raise CnnlabError(f"ONNX output shape {got.shape} differs from PyTorch's {want.shape}")
            diff = float(np.max(np.abs(got - want))) if want.size else 0.0
            worst = max(worst, diff if np.isfinite(diff) else float("inf"))
    return worst


def export_onnx(run: str | Path, out: str | Path | None = None, *, tolerance: float = DEFAULT_TOLERANCE,
                opset: int = NATIVE_OPSET, n_samples: int = 16, data_dir: str | None = None,
                tta: bool = True) -> ExportResult:
    """Export the best checkpoint of a run, else its newest (or a checkpoint file), to ONNX and check it against
    what ``cnnlab predict`` computes.

    Args:
        run: Run directory or checkpoint file.
        out: Output file; default ``model.onnx`` in the run directory (or the checkpoint's name with .onnx).
        tolerance: Largest allowed max-abs-difference of logits between `cnnlab.infer` and onnxruntime.
        opset: ONNX opset version, `MIN_OPSET` to `MAX_OPSET`.
        n_samples: Sample images for the parity check (checked as one batch and as a batch of one).
        data_dir: Where to look for the run's dataset for sample images.
        tta: Put the run's test-time augmentation into the graph (as ``predict`` applies it); False exports the
            single-view model (and checks it against ``predict`` without TTA).

    Raises:
        ConfigError: ``opset`` is out of range.
        CnnlabError: The ONNX packages are missing, export (or conversion to ``opset``) failed, or parity is worse
            than ``tolerance`` (then nothing is written).
    """
    check_opset(opset)
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
    graph_tta = trained.tta if tta else "none"
    u8 = sample_images(trained, max(2, n_samples), data_dir)
    # The reference: what `cnnlab predict` computes for these images (the run's layout, crop, dense-layer backend),
    # with the graph's TTA, in fp32 as the graph computes. The full batch and a batch of one: one graph serves both.
    kw = {**trained.inference_kw(), "tta": graph_tta, "precision": "fp32"}
    batches = [u8, u8[:1]]
    wants = [predict_logits(trained.model, b, **kw) for b in batches]
    model = trained.model.float().to(memory_format=torch.contiguous_format).eval()
    # what the ONNX graph takes: float [N,C,H,W] in [0,1] at the model's input size (after the recorded crop)
    x = to_input(u8, model.meta.input_size, crop=trained.preprocess.crop, flexible=flexible_size(model.meta),
                 name=model.meta.name)
    graph = TtaModel(model, graph_tta).eval() if graph_tta != "none" else model
    try:
        raw = _to_onnx_bytes(graph, x[:2], opset)
    except CnnlabError:
        raise
    except Exception as e:  # the exporter raises many types; a failure here is one line for the user
        raise CnnlabError(f"ONNX export of {model.meta.name} failed: {type(e).__name__}: {str(e)[:200]}") from None
    data = _with_metadata(raw, metadata(trained, graph_tta))
    diff = check_parity(data, [(x[:len(b)], want) for b, want in zip(batches, wants)])
    if not diff <= tolerance:
        raise CnnlabError(f"ONNX parity check failed: max abs difference of logits {diff:.3g} > tolerance "
                          f"{tolerance:g} over {len(x)} sample images; nothing written")
    atomic_write_bytes(out, data)
    return ExportResult(path=out, max_abs_diff=diff, n_samples=len(x), batch_sizes=tuple(len(b) for b in batches),
                        seconds=time.perf_counter() - t0, tta=graph_tta, opset=opset)
