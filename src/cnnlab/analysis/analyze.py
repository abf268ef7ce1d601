"""One trained run, evaluated and ready to plot: ``analyze(run_dir) -> Analysis``.

`Analysis` loads the run's newest checkpoint, its config and metrics log, evaluates a split of its
dataset once (through `cnnlab.infer`, as the training loop and ``cnnlab evaluate`` do), and draws every plot
from those results. The CLI's ``plot`` and ``report`` use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

import torch

from ..config import resolve_config
from ..data.augment import Augment
from ..errors import CnnlabError, DataError, UnknownSplitError
from ..infer import EvalResult, TrainedModel, load_trained
from ..io import read_jsonl
from ..rundir import read_record
from . import plots
from .metrics import Metrics, compute_metrics


@dataclass
class Analysis:
    """A trained run and its evaluation on one split.

    Attributes:
        run_dir: The run directory.
        trained: The restored model with its classes and data shape.
        run: The run's ``config.json`` (empty when missing).
        records: The metrics log records (empty when missing).
        split: The evaluated split.
        images: uint8 [N,C,H,W] of the split (None when its data could not be loaded).
        labels: int64 [N] (None likewise).
        logits: float [N, K] of the model on ``images`` (None likewise).
        metrics: Metrics of ``logits`` (None likewise).
        data_error: Why the split could not be loaded, when it could not.
        results: The run's ``results.json`` (empty when missing or unreadable).
        warnings: One line per damaged optional record that was skipped (metrics lines, results.json).
    """

    run_dir: Path
    trained: TrainedModel
    run: dict
    records: list[dict]
    split: str
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    metrics: Metrics | None = None
    data_error: str | None = None
    results: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return self.trained.classes

    @property
    def model(self) -> torch.nn.Module:
        return self.trained.model

    def need_data(self) -> None:
        """Raise DataError (with the reason) when the split's images are not available."""
        if self.images is None:
            raise DataError(self.data_error or "no evaluation data")

    def augment(self) -> tuple[Augment, bool]:
        """(the run's training augmentation, True) when it had one, else (a demonstration one, False)."""
        size = tuple(self.model.meta.input_size[1:])
        try:
            aug = Augment.from_config(resolve_config(None, self.trained.config), size)
        except CnnlabError:  # a config from another version: fall back to the demonstration distortions
            aug = None
        if aug is not None and aug.active:
            return aug, True
        return plots.demo_augment(self.trained.data_shape[0], size), False

    def image(self, index: int = 0, file: str | Path | None = None) -> tuple[torch.Tensor, int | None, str]:
        """(uint8 [C,H,W], true label or None, caption) of an image file or of example ``index`` of the split."""
        if file is not None:
            return self.trained.prepare(file)[0], None, Path(file).name
        self.need_data()
        if not -len(self.images) <= index < len(self.images):
            raise DataError(f"index {index} out of range: the {self.split} split has {len(self.images)} images")
        y = int(self.labels[index])
        return self.images[index], y, f"{self.split}[{index}] {self.classes[y]}"

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities [K] of one uint8 image [C,H,W], computed as the run evaluates."""
        return self.trained.logits(image[None]).softmax(1)[0]


# The fields the plots read from each kind of metrics record; a record without them is skipped.
_RECORD_FIELDS = {"train": ("loss", "acc", "lr"), "eval": ("loss", "accuracy")}


def _usable(record: dict) -> bool:
    """A train or eval record with an integer step and the numbers the plots draw."""
    fields = _RECORD_FIELDS.get(record.get("kind"))
    step = record.get("step")
    return fields is not None and isinstance(step, int) and not isinstance(step, bool) and all(
        isinstance(record.get(k), Real) and not isinstance(record.get(k), bool) for k in fields)


def _lines(numbers: list[int]) -> str:
    """'line 5' or 'lines 2, 5, 9, ...' (the first three)."""
    shown = ", ".join(map(str, numbers[:3]))
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{', ...' if len(numbers) > 3 else ''}"


def read_metrics(path: Path, warnings: list[str]) -> list[dict]:
    """The usable records of a run's ``metrics.jsonl`` (none when it is missing).

    The log is optional to a report, so damaged lines (not UTF-8, not JSON, not a record the plots can draw)
    are skipped, with one line in ``warnings`` naming the file and the first of them; a last line cut by a
    crash is skipped silently.
    """
    if not path.is_file():
        return []
    skipped: list[int] = []
    try:
        records = read_jsonl(path, skipped, keep=_usable)
    except OSError as e:
        warnings.append(f"{path} not read ({e.strerror or e}); no training curves")
        return []
    if skipped:
        plural = "s" if len(skipped) > 1 else ""
        warnings.append(f"{path}: skipped {len(skipped)} damaged or unknown line{plural} ({_lines(skipped)})")
    return records


def read_results(path: Path, warnings: list[str]) -> dict:
    """A run's ``results.json`` (empty when missing); one line in ``warnings`` when it is unreadable."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        warnings.append(f"{path} is unreadable ({reason}); the report leaves out what it records")
        return {}
    if not isinstance(value, dict):
        warnings.append(f"{path} is not a JSON object; the report leaves out what it records")
        return {}
    return value


def analyze(run_dir: str | Path, split: str = "test", *, data_dir: str | None = None,
            device: str | torch.device = "cpu", limit: int | None = None, require_data: bool = True,
            checkpoint: str = "auto", evaluated: tuple[int, EvalResult] | None = None) -> Analysis:
    """Load a run and evaluate it on ``split`` of its dataset.

    Args:
        run_dir: A run directory (or a checkpoint file inside one).
        split: Dataset split to evaluate ('test' or 'train').
        data_dir: First place to look for the dataset files.
        device: Where to run the model.
        limit: Evaluate only the first ``limit`` images (None: all).
        require_data: When False, a dataset that cannot be loaded (e.g. its files are not on this machine)
            leaves the evaluation empty (with ``data_error`` set) instead of raising, so plots that need no data
            still work. A split the dataset does not have is an error either way.
        checkpoint: Which of the run's checkpoints: auto (the best when kept, else the newest), latest, best
            or a file.
        evaluated: (step, result) of an evaluation of the whole split that training just did with the run's
            settings. Its logits are used instead of evaluating again when the loaded checkpoint holds that
            step's weights (every checkpoint of one step does) and they give the recorded accuracy on the
            labels loaded here; otherwise the split is evaluated.
    """
    trained = load_trained(run_dir, device, checkpoint=checkpoint)
    run_dir = Path(run_dir) if Path(run_dir).is_dir() else trained.path.parent
    config_file = run_dir / "config.json"
    run = read_record(config_file)
    warnings: list[str] = []
    records = read_metrics(run_dir / "metrics.jsonl", warnings)
    result = Analysis(run_dir=run_dir, trained=trained, run=run, records=records, split=split,
                      results=read_results(run_dir / "results.json", warnings), warnings=warnings)
    try:
        ds = trained.load_split(split, data_dir)
    except CnnlabError as e:
        if require_data or isinstance(e, UnknownSplitError):  # a wrong request, not data missing here
            raise
        result.data_error = str(e)
        return result
    images, labels = ds.images, ds.labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    result.images, result.labels = images, labels
    result.logits = _reused(evaluated, trained.step, labels)
    if result.logits is None:
        result.logits = trained.logits(images)  # the run's precision, layout, TTA, crop and eval batch size
    result.metrics = compute_metrics(result.logits, labels, trained.classes)
    return result


def _reused(evaluated: tuple[int, EvalResult] | None, step: int, labels: torch.Tensor) -> torch.Tensor | None:
    """The logits of ``evaluated`` when they are those of the loaded weights on these labels, else None."""
    if evaluated is None:
        return None
    at, res = evaluated
    if at != step or res.n != len(labels) or res.logits.ndim != 2 or len(res.logits) != len(labels):
        return None
    logits = res.logits.float()
    # the same images in the same order: the recorded accuracy again (a cheap check, not a proof)
    if abs((logits.argmax(1) == labels).float().mean().item() - res.accuracy) > 1e-6:
        return None
    return logits


@dataclass(frozen=True)
class PlotOptions:
    """What the individual plots may be asked for (``cnnlab plot`` options)."""

    layer: int = 0  # conv layer (filters) or feature module (activations)
    channel: int = 0  # input channel of the filters
    index: int = 0  # example of the split (activations, augment, probs)
    image: str | None = None  # an image file instead of ``index``
    n: int = 16  # images in a grid


def _filters(a: Analysis, o: PlotOptions):
    from .layers import filter_weights

    return plots.plot_filters(a.model, o.layer, o.channel), filter_weights(a.model, o.layer)[2].lines()


def _activations(a: Analysis, o: PlotOptions):
    img, _, caption = a.image(o.index, o.image)
    return plots.plot_activations(a.model, img, o.layer, caption, crop=a.trained.preprocess.crop), []


def _augment(a: Analysis, o: PlotOptions):
    img, y, _ = a.image(o.index, o.image)
    aug, own = a.augment()
    what = "the run's augmentation" if own else "the run used none; demonstration distortions"
    fig = plots.plot_augmentations(img, aug, a.classes[y] if y is not None else "", seed=o.index,
                                   title=f"9 distorted copies ({what})")
    return fig, []


def _probs(a: Analysis, o: PlotOptions):
    img, y, caption = a.image(o.index, o.image)
    p = a.probabilities(img)
    lines = [f"{caption}: " + ", ".join(f"{a.classes[i]} {float(p[i]):.3f}" for i in p.argsort(descending=True)[:5])]
    return plots.plot_probabilities(p, a.classes, img, y), lines


def _curves(a: Analysis, o: PlotOptions):
    return plots.plot_curves(a.records, title=f"{a.run_dir.name}: {a.trained.config.get('model', '')}"), []


def _confusion(a: Analysis, o: PlotOptions):
    from .metrics import format_confusion

    a.need_data()
    m = a.metrics
    return plots.plot_confusion(m.confusion, a.classes, f"Confusion matrix, {a.split} split"), \
        format_confusion(m.confusion, a.classes).splitlines()


def _misclassified(a: Analysis, o: PlotOptions):
    a.need_data()
    return plots.plot_misclassified(a.images, a.labels, a.logits, a.classes, o.n), []


def _predictions(a: Analysis, o: PlotOptions):
    a.need_data()
    return plots.plot_predictions(a.images, a.labels, a.logits, a.classes, o.n), []


def _samples(a: Analysis, o: PlotOptions):
    a.need_data()
    return plots.plot_samples(a.images, a.labels, a.classes, o.n, title=f"{a.split} samples with true labels"), []


# kind -> fn(analysis, options) -> (figure, text lines to print); `cnnlab plot RUN KIND` looks kinds up here.
PLOT_KINDS: dict[str, Callable] = {
    "samples": _samples, "predictions": _predictions, "misclassified": _misclassified, "confusion": _confusion,
    "curves": _curves, "filters": _filters, "activations": _activations, "augment": _augment, "probs": _probs,
}
DATA_FREE_KINDS = {"curves", "filters"}  # kinds that need no dataset (with --image: activations, augment, probs)
