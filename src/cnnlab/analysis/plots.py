"""Every plot of the tutorials (and fastai's interpretation plots) as matplotlib figures.

Each function returns a `matplotlib.figure.Figure` of a fixed size at `DPI`, built without pyplot (no
global figure registry, nothing to close, safe in threads and servers); `save_figure` writes it as PNG
with the Agg renderer. Images are uint8 tensors [C, H, W] (C = 1 or 3) as the datasets hold them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..data.augment import Augment, fit_to_size
from ..errors import ConfigError, DataError
from .layers import filter_weights, layer_output

DPI = 100  # pixels per inch of every figure: a figure of (w, h) inches is (100 w) x (100 h) pixels
GRID_SIZE = (8.0, 8.8)  # image grids (samples, predictions, misclassified): 800 x 880 px
WRONG = "#c62828"  # red for wrong predictions
RIGHT = "#1b5e20"  # dark green for right ones


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly (no pyplot backend selection)
    return fig


FIGURE_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".jpg": "jpeg", ".jpeg": "jpeg"}


def figure_format(path: str | Path) -> str:
    """The format a plot file's suffix names (PNG without one); ConfigError for a suffix of another format."""
    suffix = Path(path).suffix
    fmt = FIGURE_FORMATS.get(suffix.lower(), "png" if not suffix else None)
    if fmt is None:
        raise ConfigError(f"cannot write a plot as {suffix!r}: name the file .png, .svg, .pdf or .jpg")
    return fmt


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` at exactly its size (no tight cropping) in the format its suffix names (PNG without one);
    creates the parent folder.

    Raises:
        ConfigError: A suffix of another format (the file would hold bytes its name does not promise).
    """
    path = Path(path)
    fmt = figure_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format=fmt)
    return path


def png_bytes(fig: Figure) -> bytes:
    """The PNG encoding of ``fig`` (for embedding in HTML)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    return buf.getvalue()


def _as_hwc(image: torch.Tensor) -> tuple[np.ndarray, dict]:
    """uint8 or float [C,H,W] -> (array for imshow, imshow keywords). Grayscale is shown as stored
    (white digit on black for MNIST), with a fixed 0..255 scale so faint images stay faint."""
    img = image.detach().cpu()
    if img.dtype != torch.uint8:
        img = (img.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise DataError(f"an image [C,H,W] with 1 or 3 channels expected, got shape {tuple(image.shape)}")
    if img.shape[0] == 1:
        return img[0].numpy(), {"cmap": "gray", "vmin": 0, "vmax": 255}
    return img.permute(1, 2, 0).numpy(), {}


def _show(ax, image: torch.Tensor) -> None:
    arr, kw = _as_hwc(image)
    ax.imshow(arr, interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])


def _mark(ax, ok: bool | None) -> None:
    """A coloured frame: red for a wrong prediction; none when there is no prediction."""
    if ok is None:
        for s in ax.spines.values():
            s.set_visible(False)
        return
    for s in ax.spines.values():
        s.set_edgecolor(RIGHT if ok else WRONG)
        s.set_linewidth(1.0 if ok else 3.0)


def plot_image_grid(images: torch.Tensor, titles: Sequence[str], correct: Sequence[bool] | None = None,
                    title: str = "", size: tuple[float, float] = GRID_SIZE) -> Figure:
    """Images [N,C,H,W] in a square grid, each with its caption; wrong ones (``correct`` False) in red.

    Up to 25 images; the grid is ceil(sqrt(N)) wide, the figure size is fixed.
    """
    n = min(len(images), 25)
    if n == 0:
        raise DataError("no images to plot")
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = _figure(size)
    axes = fig.subplots(rows, cols, squeeze=False)
    font = 10 if cols <= 4 else 8
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        _show(ax, images[i])
        ok = None if correct is None else bool(correct[i])
        _mark(ax, ok)
        ax.set_title(titles[i], fontsize=font, color=WRONG if ok is False else "black", linespacing=1.15)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def plot_samples(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], n: int = 16,
                 title: str = "Samples with true labels") -> Figure:
    """The first ``n`` images with their true class names (the tutorials' ``plot_images``)."""
    n = min(n, len(images))
    return plot_image_grid(images[:n], [f"True: {classes[int(y)]}" for y in labels[:n]], title=title)


def _pred_titles(labels, probs, classes) -> tuple[list[str], list[bool]]:
    preds = probs.argmax(1)
    titles = [f"True: {classes[int(t)]}\nPred: {classes[int(p)]} {float(probs[i, p]):.2f}"
              for i, (t, p) in enumerate(zip(labels, preds))]
    return titles, [bool(t == p) for t, p in zip(labels, preds)]


def plot_predictions(images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, classes: Sequence[str],
                     n: int = 16, title: str = "Predictions (wrong ones in red)") -> Figure:
    """The first ``n`` images with true class, predicted class and its probability; mistakes framed red."""
    n = min(n, len(images))
    titles, ok = _pred_titles(labels[:n], logits[:n].detach().float().softmax(1), classes)
    return plot_image_grid(images[:n], titles, ok, title=title)


def plot_misclassified(images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, classes: Sequence[str],
                       n: int = 16, title: str | None = None) -> Figure:
    """Up to ``n`` misclassified images, most confidently wrong first (the tutorial's
    ``plot_example_errors``, ordered like fastai's ``plot_top_losses``)."""
    probs = logits.detach().float().softmax(1)
    wrong = (probs.argmax(1) != labels).nonzero().flatten()
    if len(wrong) == 0:
        fig = _figure((6.0, 2.0))
        fig.text(0.5, 0.5, f"No misclassified images among {len(labels)}", ha="center", va="center", fontsize=14)
        return fig
    true_p = probs[wrong, labels[wrong]]
    wrong = wrong[true_p.argsort()][:n]  # lowest probability of the true class = highest loss
    titles, ok = _pred_titles(labels[wrong], probs[wrong], classes)
    title = title or f"Misclassified: {int((probs.argmax(1) != labels).sum())} of {len(labels)} (highest loss first)"
    return plot_image_grid(images[wrong], titles, ok, title=title)


def _montage(maps: np.ndarray, gap: int = 1) -> np.ndarray:
    """Tiles maps [N, h, w] in a ceil(sqrt(N))-wide grid separated by ``gap`` NaN pixels (drawn in the
    colormap's 'bad' colour), so one imshow draws them all (64 axes would take seconds)."""
    scale = max(1, 16 // max(maps.shape[1:]))  # blow small maps (3x3 kernels) up so a 1-pixel gap stays thin
    if scale > 1:
        maps = maps.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w = maps.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap), np.nan, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        out[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = maps[i]
    return out


def plot_filters(model: torch.nn.Module, layer: int = 0, channel: int = 0) -> Figure:
    """Weights of conv layer ``layer`` for input channel ``channel``, one square per filter.

    As the CIFAR tutorial's ``plot_conv_weights``: a diverging map ('seismic', blue < 0 < red) on a scale
    symmetric about 0 and common to the whole layer, so filters can be compared; min/max/mean/std of the
    layer's weights in the title (`cnnlab plot` also prints them as the tutorial does).
    """
    name, w, stats = filter_weights(model, layer)
    if not 0 <= channel < w.shape[1]:
        raise DataError(f"input channel {channel} out of range: conv layer {layer} has {w.shape[1]} input channels "
                        f"(0..{w.shape[1] - 1})")
    cmap = colormaps["seismic"].with_extremes(bad="#9e9e9e")  # gray gaps between filters
    fig = _figure((7.5, 6.8))
    ax = fig.add_subplot()
    im = ax.imshow(_montage(w[:, channel].numpy()), cmap=cmap, vmin=-stats.abs_max, vmax=stats.abs_max,
                   interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, shrink=0.8, label="weight")
    kh, kw = w.shape[2:]
    ax.set_title(f"Conv layer {layer} (features.{name}): {w.shape[0]} filters {kh}x{kw}, input channel {channel}"
                 f"\n{stats.lines()[0]}   {stats.lines()[1]}", fontsize=11)
    return fig


def plot_activations(model: torch.nn.Module, image: torch.Tensor, layer: int = 0, label: str = "",
                     crop: tuple[int, int] | None = None) -> Figure:
    """Output of feature module ``layer`` for one image (uint8 [C,H,W]; ``crop``: the run's recorded centre
    crop), one square per channel.

    As the CIFAR tutorial's ``plot_layer_output``: grayscale 'binary' map (white = low, black = high) on one
    scale from the minimum to the maximum of the whole output. The input image is shown beside it.
    """
    name, out = layer_output(model, image, layer, crop=crop)
    module = dict(model.features.named_modules())[name]
    lo, hi = float(out.min()), float(out.max())
    cmap = colormaps["binary"].with_extremes(bad="#90caf9")  # light blue gaps: not a value on the gray scale
    fig = _figure((10.0, 6.8))
    left, right = fig.subplots(1, 2, width_ratios=[1, 3.2])
    seen = fit_to_size(image[None], crop)[0] if crop else image  # what the model is fed
    _show(left, seen)
    left.set_title(f"Input{': ' + label if label else ''}\n(as fed, {seen.shape[-2]}x{seen.shape[-1]})", fontsize=11)
    im = right.imshow(_montage(out.numpy()), cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1e-6,
                      interpolation="nearest")
    right.set_xticks([])
    right.set_yticks([])
    fig.colorbar(im, ax=right, shrink=0.8, label="activation")
    c, h, w = out.shape
    right.set_title(f"Feature module {layer} (features.{name}, {type(module).__name__}): {c} maps {h}x{w}"
                    f"\nmin {lo:.3g}, max {hi:.3g}", fontsize=11)
    return fig


def demo_augment(channels: int, size: tuple[int, int]) -> Augment:
    """Distortions to preview for a run that trained without any: the CIFAR tutorial's (crop, flip, hue,
    contrast, brightness, saturation) for colour images; small shifts, contrast and brightness (no flip,
    which would change a digit) for grayscale ones."""
    if channels == 3:
        return Augment(size=size, random_crop=True, flip=True, hue=0.05, contrast=(0.3, 1.0), brightness=0.2,
                       saturation=(0.0, 2.0))
    return Augment(size=size, translate=min(3, min(size) - 1), contrast=(0.3, 1.0), brightness=0.2)


def plot_augmentations(image: torch.Tensor, augment: Augment, label: str = "", seed: int = 0,
                       title: str = "") -> Figure:
    """Nine distorted copies of one image (uint8 [C,H,W]), as the tutorial's ``plot_distorted_image``."""
    x = image.detach().cpu().float().div(255.0)[None].repeat(9, 1, 1, 1)
    out = augment(x, torch.Generator().manual_seed(seed))
    caption = f"True: {label}" if label else ""
    return plot_image_grid(out, [caption] * 9, title=title or "9 distorted copies", size=(6.6, 7.4))


def plot_probabilities(probs: torch.Tensor, classes: Sequence[str], image: torch.Tensor | None = None,
                       true: int | None = None, max_classes: int = 20) -> Figure:
    """Bar chart of one image's class probabilities (the ``max_classes`` largest), beside the image.

    The predicted class is drawn in red when wrong, green when right (blue when the truth is unknown);
    the true class's label is bold.
    """
    probs = probs.detach().float().cpu().flatten()
    if len(probs) != len(classes):
        raise DataError(f"{len(probs)} probabilities for {len(classes)} classes")
    k = min(max_classes, len(classes))
    order = probs.argsort(descending=True)[:k].tolist() if len(classes) > max_classes else list(range(len(classes)))
    pred = int(probs.argmax())
    fig = _figure((9.0, max(3.6, 0.34 * k + 1.4)))
    if image is not None:
        left, ax = fig.subplots(1, 2, width_ratios=[1, 2.2])
        _show(left, image)
        left.set_title(f"True: {classes[true]}" if true is not None else "Input", fontsize=11)
    else:
        ax = fig.add_subplot()
    pred_colour = "#1565c0" if true is None else (RIGHT if pred == true else WRONG)
    colours = [pred_colour if i == pred else "#b0bec5" for i in order]
    y = np.arange(len(order))
    ax.barh(y, [float(probs[i]) for i in order], color=colours)
    ax.set_yticks(y, [classes[i] for i in order], fontsize=10)
    for t, i in zip(ax.get_yticklabels(), order):
        if i == true:
            t.set_fontweight("bold")
    ax.invert_yaxis()  # first class (or most probable) on top
    ax.set_xlim(0, 1.12)  # room for the value labels right of a full bar
    ax.set_xlabel("probability")
    for yi, i in zip(y, order):
        ax.text(float(probs[i]) + 0.01, yi, f"{float(probs[i]):.3f}", va="center", fontsize=9)
    ax.set_title(f"Predicted: {classes[pred]} ({float(probs[pred]):.1%})", fontsize=11,
                 color=pred_colour if true is not None else "black")
    return fig


def _smooth(values: np.ndarray, n: int) -> np.ndarray:
    """Exponential moving average with a window of about n points (TensorBoard-style smoothing)."""
    alpha = 2.0 / (n + 1)
    out = np.empty_like(values)
    acc = values[0]
    for i, v in enumerate(values):
        acc = alpha * v + (1 - alpha) * acc
        out[i] = acc
    return out


def plot_curves(records: list[dict], title: str = "") -> Figure:
    """Training loss, accuracy and learning rate against step, from a run's metrics records.

    Train values are per logged batch (light) with a smoothed line when there are many; evaluation
    records are drawn as points joined by a line, one colour per split.
    """
    train = sorted((r for r in records if r.get("kind") == "train"), key=lambda r: r["step"])
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        raise DataError("no training records to plot (is metrics.jsonl empty?)")
    steps = np.array([r["step"] for r in train], dtype=float)
    fig = _figure((13.0, 4.2))
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    eval_colours = ["#d84315", "#6a1b9a", "#00838f"]
    for ax, key, ekey, label in ((ax_loss, "loss", "loss", "loss (cross-entropy)"),
                                 (ax_acc, "acc", "accuracy", "accuracy")):
        vals = np.array([r[key] for r in train], dtype=float)
        many = len(vals) > 20
        ax.plot(steps, vals, color="#1565c0", alpha=0.3 if many else 1.0, lw=1,
                label="train batch" if not many else "train batch (raw)")
        if many:
            ax.plot(steps, _smooth(vals, max(5, len(vals) // 20)), color="#1565c0", lw=2, label="train (smoothed)")
        for j, split in enumerate(sorted({r.get("split", "test") for r in evals})):
            pts = sorted((r["step"], r[ekey]) for r in evals if r.get("split", "test") == split)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=eval_colours[j % 3], ms=5, lw=1.5,
                    label=f"{split}")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    ax_acc.set_ylim(-0.02, 1.02)
    ax_lr.plot(steps, [r["lr"] for r in train], color="#2e7d32", lw=1.5)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(alpha=0.3)
    ax_loss.set_title("Loss")
    ax_acc.set_title("Accuracy")
    ax_lr.set_title("Learning rate")
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Heatmap of a confusion matrix (rows true, columns predicted) with class names and counts.

    Colour is the fraction of each true class (so rare classes read as well as common ones); the
    numbers are counts. Counts are written only while they fit (up to 20 classes).
    """
    k = len(classes)
    cm = np.asarray(confusion)
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = min(14.0, max(7.0, 0.45 * k + 2.5))  # 7 in up to 10 classes, then growing with k
    fig = _figure((side + 1.2, side))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    font = 10 if k <= 10 else (8 if k <= 20 else 6)
    if k <= 60:
        ax.set_xticks(range(k), classes, rotation=45, ha="right", rotation_mode="anchor", fontsize=font)
        ax.set_yticks(range(k), classes, fontsize=font)
    if k <= 20:
        for t in range(k):
            for p in range(k):
                if cm[t, p]:
                    ax.text(p, t, str(int(cm[t, p])), ha="center", va="center", fontsize=font - 1,
                            color="white" if frac[t, p] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} ({int(cm.sum())} images, accuracy {np.trace(cm) / max(cm.sum(), 1):.1%})", fontsize=12)
    return fig
