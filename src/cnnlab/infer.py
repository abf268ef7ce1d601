"""A trained run at inference time: load it, prepare inputs as recorded, predict (with TTA), evaluate.

Everything that runs a trained model goes through here: ``cnnlab evaluate`` and ``predict`` (through
`Classifier`), ``report`` and ``plot`` (`cnnlab.analysis`), ``export`` and ``serve``; the training loop
evaluates with the same `predict_logits`. The run's recorded precision (bf16/fp32), memory layout
(channels_last), test-time augmentation and preprocessing (`cnnlab.preprocess.Preprocess`) are read from the
checkpoint and used as recorded, so every path computes the same logits. Nothing here imports `cnnlab.train`.

    trained = load_trained("runs/lenet5-mnist")
    print(trained.predict("digit.png")[0]["label"])
    print(trained.evaluate_split("test").accuracy)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch._prims_common import suggest_memory_format  # Tensor.suggest_memory_format, which Python lacks
from torch.nn.modules.utils import _pair

from . import checkpoint as ck
from .config import TTA_MODES
from .data import ArrayDataset, load_dataset
from .data.augment import fit_to_size
from .data.images import as_batch
from .data.loader import drop_pages, file_backed
from .errors import CheckpointError, CnnlabError, ConfigError, DataError
from .models import create_model
from .models.layers import _exporting, use_onednn_linear
from .modes import eval_mode
from .preprocess import Preprocess, check_input, flexible_size
from .rundir import read_record

__all__ = ["EvalResult", "TrainedModel", "autocast", "describe_predictions", "eval_mode", "evaluate",
           "find_checkpoint", "load_trained", "model_input", "predict_logits", "select_device", "to_input",
           "tta_logits"]


def select_device(spec: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cuda' without a GPU is a ConfigError."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but no CUDA GPU is available")
    return torch.device(spec)


def autocast(device: torch.device, precision: str):
    """bf16 or fp16 autocast context when asked for, else a no-op."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def to_input(images_u8: torch.Tensor, input_size: tuple[int, int, int], channels_last: bool = False, *,
             crop: tuple[int, int] | None = None, flexible: bool = False, name: str = "the model") -> torch.Tensor:
    """uint8 [N,C,H,W] -> float [0,1] [N,C,h,w], the model's input.

    Args:
        images_u8: Images at the run's recorded size.
        input_size: The model's (C, H, W).
        channels_last: Return a channels_last tensor (as the run was trained).
        crop: The run's recorded centre crop (H, W), if it evaluates on one.
        flexible: The model takes any input size (``ModelMeta.flexible_size``).
        name: The model's name, for the error message.

    Raises:
        ModelError: The images (after the recorded crop) are not what the model takes. Nothing is cropped or
            padded silently.
    """
    if crop is not None:  # on the bytes: cropping and zero padding give the same floats before or after scaling
        images_u8 = fit_to_size(images_u8, tuple(crop))
    check_input(tuple(images_u8.shape[1:]), tuple(input_size), flexible=flexible, name=name)
    # One pass writes the scaled floats straight in the model's layout (a cast, a division and a layout copy
    # would each read and write the whole batch); the same float32 division, so the same values.
    fmt = torch.channels_last if channels_last else torch.preserve_format
    x = torch.empty_like(images_u8, dtype=torch.float32, memory_format=fmt)
    return torch.div(images_u8, 255.0, out=x)


def model_input(model: nn.Module, images_u8: torch.Tensor, crop: tuple[int, int] | None = None,
                channels_last: bool = False) -> torch.Tensor:
    """`to_input` for ``model`` (its input size, name and whether it takes any size from its ``meta``)."""
    meta = model.meta
    return to_input(images_u8, meta.input_size, channels_last, crop=crop, flexible=flexible_size(meta),
                    name=meta.name)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    n: int
    logits: torch.Tensor  # [N, num_classes], on CPU

    def as_dict(self) -> dict:
        return {"loss": self.loss, "accuracy": self.accuracy, "n": self.n}


def _tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views whose logits are averaged: the image, its mirror and/or 1-pixel shifts (airbench's TTA)."""
    views = [x]
    if mode in ("flip", "flip-translate"):
        views.append(x.flip(-1))
    if mode in ("translate", "flip-translate"):
        for v in list(views):
            views.append(F.pad(v, (1, 0, 1, 0), mode="replicate")[..., :-1, :-1])  # shift right/down by 1
            views.append(F.pad(v, (0, 1, 0, 1), mode="replicate")[..., 1:, 1:])  # shift left/up by 1
    return views


DROP_PAGES_FROM = 2**24  # bytes: a mapped split at least this large has its pages handed back as it is evaluated


EVAL_INPUT_BYTES = 128 * 2**20  # float input of one evaluation batch; its activations are a small multiple of it


def _bounded_batch(batch_size: int, images_u8: torch.Tensor) -> int:
    """``batch_size``, lowered so that one batch's float input stays within `EVAL_INPUT_BYTES`.

    Recipes set evaluation batches of 1,000-2,000 for 28 px digits (a few MB); at 224 px the same batch is
    600 MB of float input before the first activation, which alone broke the memory budget of a streamed folder.
    In evaluation mode an image's logits do not depend on its batch (up to rounding), so only the peak changes.
    """
    per_image = max(1, math.prod(images_u8.shape[1:]) * 4)
    return max(1, min(batch_size, EVAL_INPUT_BYTES // per_image))


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """fp32 logits of float inputs ``x`` [N,C,H,W], averaged over the TTA views (one view: the model's own output,
    no averaging ops). What `predict_logits` computes after `model_input`; ONNX export traces it too, so the
    exported graph averages the same views in the same order."""
    if tta == "none":
        return model(x).float()
    views = _tta_views(x, tta)
    return sum(model(v).float() for v in views) / len(views)


def _eval_mode_if_needed(model: nn.Module) -> contextlib.AbstractContextManager:
    """`eval_mode`, unless no submodule is training (a loaded run's model never is): switching and restoring
    every submodule's flag walks the module tree twice, a fixed cost that a server's small batches notice."""
    if any(m.training for m in model.modules()):
        return eval_mode(model)
    return contextlib.nullcontext(model)


@torch.no_grad()
def predict_logits(model: nn.Module, images_u8: torch.Tensor, *, batch_size: int = 1000, tta: str = "none",
                   device: torch.device | None = None, precision: str = "fp32", channels_last: bool = False,
                   crop: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits [N, num_classes] on CPU for uint8 images [N,C,H,W], in eval mode (the mode is restored after).

    Keywords are the run's recorded settings (`TrainedModel.inference_kw` gives them for a loaded run):
    test-time augmentation, precision ('fp32', or 'bf16' / 'fp16' autocast), layout and centre crop (see `to_input`).
    """
    device = device or next(model.parameters()).device
    out = []
    batch_size = _bounded_batch(batch_size, images_u8)
    # A folder's decoded cache: hand read pages back, as training's streaming does. Small inputs (a request's
    # images) are never worth the look at the process's mappings.
    mapped = images_u8.numel() * images_u8.element_size() >= DROP_PAGES_FROM and file_backed(images_u8)
    with _eval_mode_if_needed(model):
        for i in range(0, len(images_u8), batch_size):
            x = model_input(model, images_u8[i:i + batch_size].to(device), crop, channels_last)
            if mapped:
                drop_pages(images_u8[i:i + batch_size])
            with autocast(device, precision):
                out.append(tta_logits(model, x, tta).cpu())
    if mapped:  # the kernel maps a few pages around each one read: those the per-batch drops missed
        drop_pages(images_u8)
    if len(out) == 1:  # one batch (every request a server batches): its logits are already a tensor of their own
        return out[0]
    return torch.cat(out) if out else torch.zeros(0, model.meta.num_classes)


def evaluate(model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, **kw) -> EvalResult:
    """Accuracy and mean cross-entropy of ``model`` on a labelled set (keywords as `predict_logits`)."""
    return eval_result(predict_logits(model, images_u8, **kw), labels)


def eval_result(logits: torch.Tensor, labels: torch.Tensor) -> EvalResult:
    """Accuracy and mean cross-entropy of logits [N, K] against labels [N]."""
    labels = labels.cpu()
    loss = F.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    acc = (logits.argmax(1) == labels).float().mean().item() if len(labels) else float("nan")
    return EvalResult(loss=loss, accuracy=acc, n=len(labels), logits=logits)


def describe_predictions(probs: torch.Tensor, classes: list[str], top_k: int = 3) -> list[dict]:
    """Turn probabilities [N, K] into readable dicts: class index and label, its probability, the top-k, all."""
    out = []
    k = max(1, min(top_k, probs.shape[1]))
    for p in probs:
        vals, idx = p.topk(k)
        out.append({"class": int(idx[0]), "label": classes[int(idx[0])], "probability": float(vals[0]),
                    "top_k": [{"class": int(i), "label": classes[int(i)], "probability": float(v)}
                              for v, i in zip(vals, idx)],
                    "probabilities": [float(v) for v in p]})
    return out


class _Dataset(NamedTuple):  # what `Preprocess.for_dataset` reads of a DatasetInfo
    name: str
    shape: tuple[int, int, int]


@dataclass
class TrainedModel:
    """A model ready for inference, with what is needed to feed it and name its outputs.

    Attributes:
        model: The network, in eval mode, on its device (channels_last when the run trained so).
        classes: Class names in label order.
        data_shape: (C, H, W) of the training images (inputs are resized to this).
        dataset: The dataset the run trained on ('' when unknown).
        step: Optimisation steps done.
        config: The run's TrainConfig as a dict.
        path: The checkpoint file.
        preprocess: How inputs are prepared (None: the defaults of a run saved before it was recorded).
    """

    model: nn.Module
    classes: list[str]
    data_shape: tuple[int, int, int]
    dataset: str
    step: int
    config: dict
    path: Path
    preprocess: Preprocess | None = None

    def __post_init__(self) -> None:
        if self.preprocess is None:
            self.preprocess = Preprocess.for_dataset(_Dataset(self.dataset, tuple(self.data_shape)),
                                                     self.model.meta.input_size)

    @property
    def precision(self) -> str:
        return self.config.get("precision") or "fp32"

    @property
    def channels_last(self) -> bool:
        return bool(self.config.get("channels_last", False))

    @property
    def tta(self) -> str:
        tta = self.config.get("tta", "none")
        return {True: "flip", False: "none"}.get(tta, tta or "none")  # older runs stored a bool (True: mirror)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tta_mode(self, tta: str | None = None) -> str:
        """The test-time views to use: ``tta`` when given (one of `config.TTA_MODES`), else the run's own."""
        if tta is None:
            return self.tta
        if tta not in TTA_MODES:  # an unknown mode would quietly mean one view
            raise ConfigError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        return tta

    def inference_kw(self, batch_size: int | None = None, tta: str | None = None) -> dict:
        """The `predict_logits` keywords of this run: its TTA (``tta`` overrides it, see `tta_mode`), precision,
        layout, crop and eval batch size."""
        return {"batch_size": batch_size or int(self.config.get("eval_batch_size") or 1000),
                "tta": self.tta_mode(tta), "precision": self.precision,
                "channels_last": self.channels_last, "crop": self.preprocess.crop}

    def logits(self, images_u8: torch.Tensor, batch_size: int | None = None, tta: str | None = None) -> torch.Tensor:
        """Logits [N, K] on CPU of uint8 images [N,C,H,W] at the recorded size, computed as the run evaluates
        (``tta``: other test-time views than the recorded ones, one of `config.TTA_MODES`)."""
        return predict_logits(self.model, images_u8, **self.inference_kw(batch_size, tta))

    def evaluate(self, images_u8: torch.Tensor, labels: torch.Tensor, tta: str | None = None) -> EvalResult:
        """Accuracy and loss on labelled uint8 images, computed exactly as the training loop's evaluation
        (``tta`` as in `logits`)."""
        return eval_result(self.logits(images_u8, tta=tta), labels)

    def load_split(self, split: str = "test", data_dir: str | None = None, download: bool = True) -> ArrayDataset:
        """A split of the run's own dataset; DataError if it cannot be found or its classes do not match."""
        name = self.dataset or self.config.get("dataset", "")
        if not name:
            raise DataError(f"{self.path} does not record its dataset")
        ds = load_dataset(name, split, data_dir=data_dir, download=download)
        if len(ds.info.class_names) != len(self.classes):
            raise DataError(f"{ds.info.name} has {len(ds.info.class_names)} classes, the model {len(self.classes)}")
        return ds

    def evaluate_split(self, split: str = "test", data_dir: str | None = None, tta: str | None = None) -> EvalResult:
        """`evaluate` on a split of the run's dataset."""
        self.tta_mode(tta)  # a bad ``tta`` fails before the data is read
        ds = self.load_split(split, data_dir)
        return self.evaluate(ds.images, ds.labels, tta)

    def prepare(self, images, invert: str | None = None, centre: bool = False) -> torch.Tensor:
        """Paths, PIL images, arrays or a tensor -> uint8 [N,C,H,W] as the run prepares images.

        Args:
            images: What `cnnlab.data.images.as_batch` takes.
            invert: 'auto' | 'yes' | 'no' to override the run's recorded polarity (None: as recorded).
            centre: Grayscale only: frame the ink as MNIST frames its digits.
        """
        p = self.preprocess
        extra = {}  # passed only when not the default, so image readers without these keywords still work
        if p.resize != "stretch":
            extra["resize"] = p.resize
        if p.interpolation != "bilinear":
            extra["interpolation"] = p.interpolation
        return as_batch(images, p.channels, p.size, invert or p.invert, centre, **extra)

    def predict_proba(self, images, invert: str | None = None, centre: bool = False) -> torch.Tensor:
        """Class probabilities [N, K] of images (as `prepare` takes them)."""
        return torch.softmax(self.logits(self.prepare(images, invert, centre)), 1)

    def predict(self, images, top_k: int = 3, invert: str | None = None, centre: bool = False) -> list[dict]:
        """One dict per image (see `describe_predictions`)."""
        return describe_predictions(self.predict_proba(images, invert, centre), self.classes, top_k)


def find_checkpoint(path: str | Path, which: str = "auto") -> Path:
    """``path`` itself if it is a file, else the run's best checkpoint when it kept one, else its newest
    (``which``: auto, latest, best or a file; see `cnnlab.checkpoint.choose_checkpoint`)."""
    return ck.choose_checkpoint(path, which)


def recorded_linear_backend(checkpoint_file: Path) -> str:
    """The fp32 dense-layer backend ("torch" or "onednn") the run evaluated with, from its config.json.

    A checkpoint without its run's config.json (copied alone, beside someone else's config.json, or saved before
    this was recorded) gets "torch": the checkpoint itself is all a model needs.
    """
    try:
        record = read_record(checkpoint_file.parent / "config.json")
    except (CnnlabError, OSError, ValueError):
        return "torch"
    backend = record.get("fp32_linear")
    return backend if backend in ("torch", "onednn") else "torch"


# Where `WindowMaxPool2d` takes the slices (`WindowMaxPool2d.pays`): inputs of at least this many values, and in
# channels-last layout, fewer channels than this.
WINDOW_MAX_MIN_NUMEL = 1 << 15
WINDOW_MAX_CL_CHANNELS = 32


class WindowMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose windows tile the image (window = stride, no padding), computed at inference as the
    element-wise maximum of the window's strided slices.

    On the CPU ``max_pool2d`` always computes the argmax indices a backward pass would need, in a kernel that is
    slow for the few channels of small nets; ``torch.maximum`` of the slices is vectorised and gives the same
    values (a maximum is exact; NaN propagates as in ``max_pool2d``) in the same memory layout. Inputs that need
    a gradient, tracing and export (ONNX sees ``MaxPool``), and ceil-mode windows running off the edge take
    ``nn.MaxPool2d``'s own path. Same state dict (none) and outputs.
    """

    @staticmethod
    def tiles(pool: nn.Module) -> bool:
        """Whether ``pool`` is a plain ``nn.MaxPool2d`` whose windows tile the input (what this class computes)."""
        return (type(pool) is nn.MaxPool2d and not pool.return_indices
                and _pair(pool.stride or pool.kernel_size) == _pair(pool.kernel_size)
                and _pair(pool.padding) == (0, 0) and _pair(pool.dilation) == (1, 1))

    @staticmethod
    def pays(x: torch.Tensor) -> bool:
        """Whether the slices are likely the cheaper way for ``x``: a fixed cost of a few small operations, so
        not for small tensors; and ``max_pool2d``'s channels-last kernel vectorises over the channels, so it is
        quick itself when there are many (its contiguous-layout kernel is slow at any width)."""
        if x.numel() < WINDOW_MAX_MIN_NUMEL:
            return False
        few_channels = x.dim() != 4 or x.shape[1] < WINDOW_MAX_CL_CHANNELS
        return few_channels or not x.is_contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting() or (x.requires_grad and torch.is_grad_enabled()) or x.dim() not in (3, 4):
            return super().forward(x)
        kh, kw = _pair(self.kernel_size)
        h, w = x.shape[-2:]
        ragged = self.ceil_mode and (h % kh or w % kw)  # a last, partial window
        if ragged or h < kh or w < kw or not self.pays(x):
            return super().forward(x)
        h, w = h // kh * kh, w // kw * kw  # floor mode drops the last rows / columns that fill no window
        rows = _max_of([x[..., i:h:kh, :w] for i in range(kh)])
        # max_pool2d's output layout (channels_last in, channels_last out): the next layer's kernels see the same
        # strides, hence compute the same sums.
        out = torch.empty((*x.shape[:-2], h // kh, w // kw), dtype=x.dtype, device=x.device,
                          memory_format=suggest_memory_format(x))
        return _max_of([rows[..., j::kw] for j in range(kw)], out=out)


def _max_of(parts: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Element-wise maximum of equally shaped tensors (into ``out`` when given)."""
    if len(parts) == 1:
        return parts[0] if out is None else out.copy_(parts[0])
    acc = parts[0]
    for k, p in enumerate(parts[1:], 2):
        acc = torch.maximum(acc, p, out=out) if k == len(parts) and out is not None else torch.maximum(acc, p)
    return acc


def use_window_max_pool(model: nn.Module) -> int:
    """Turn every ``nn.MaxPool2d`` of ``model`` whose windows tile its input into a `WindowMaxPool2d`, in place;
    returns the number changed."""
    changed = 0
    for m in model.modules():
        if WindowMaxPool2d.tiles(m):
            m.__class__ = WindowMaxPool2d
            changed += 1
    return changed


def apply_cpu_rewrites(model: nn.Module, linear: str, device: str | torch.device) -> None:
    """On the CPU, run fp32 dense layers through the backend training evaluated with (`cnnlab.models.layers`):
    oneDNN's rounding differs from torch's BLAS, so this makes `evaluate` give the figures training reported.
    ONNX export still traces ``nn.Linear``'s own path. Tiling max-pools compute without their indices
    (`WindowMaxPool2d`: the same values). Training's other rewrite, max-pool before ReLU, gives bit-identical
    outputs and is left out, so inspection sees the layers in the architecture's own order."""
    cpu = torch.device(device).type == "cpu"
    use_onednn_linear(model, linear if cpu else "torch")
    if cpu:
        use_window_max_pool(model)


def load_trained(path: str | Path, device: str | torch.device = "cpu", prefer_ema: bool = True,
                 checkpoint: str = "auto") -> TrainedModel:
    """Load a run's best checkpoint (else its newest; or a given checkpoint file) in eval mode, as the run
    recorded it.

    The architecture is rebuilt from the name and arguments stored in the checkpoint; weights must match it
    exactly. With ``prefer_ema`` the averaged weights are used when the run kept them. ``checkpoint`` chooses
    another one of the run's: latest, best or a file. The model is put in channels_last layout when the run
    trained so; its preprocessing is checked against the model here, so a server fails before it opens a port.

    Raises:
        CheckpointError: No checkpoint, a corrupt one, or one whose model cannot be rebuilt.
        ModelError: The recorded preprocessing does not give the model's input size.
    """
    file = find_checkpoint(path, checkpoint)
    tensors, meta = ck.load_checkpoint(file)
    try:
        m = meta["model"]
        model = create_model(m["name"], **m["args"])
    except KeyError as e:
        raise CheckpointError(f"{file}: checkpoint header lacks {e}") from None
    except CnnlabError as e:
        raise CheckpointError(f"{file}: cannot rebuild its model: {e}") from None
    ck.load_state_strict(model, ck.served_weights(tensors, prefer_ema), str(file))
    apply_cpu_rewrites(model, recorded_linear_backend(file), device)
    data, config = meta.get("data", {}), meta.get("config", {})
    if config.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    model.to(device).eval()
    classes = data.get("classes") or [str(i) for i in range(model.meta.num_classes)]
    pre = Preprocess.from_json(data["preprocess"]) if data.get("preprocess") else None
    shape = pre.shape if pre else tuple(data.get("shape") or model.meta.input_size)
    trained = TrainedModel(model=model, classes=list(classes), data_shape=shape, dataset=data.get("dataset", ""),
                           step=meta.get("step", 0), config=config, path=file, preprocess=pre)
    p, mm = trained.preprocess, model.meta
    check_input((p.channels, *p.input_hw), mm.input_size, flexible=flexible_size(mm), name=mm.name)
    return trained
