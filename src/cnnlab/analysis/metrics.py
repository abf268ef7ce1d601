"""Evaluation metrics as pure functions of logits and labels: no model, no files, no plotting.

Everything takes logits [N, K] (float) and labels [N] (int) as tensors and returns plain numbers,
numpy arrays or small frozen dataclasses, so the same results feed the CLI's text, the plots and the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError


@dataclass(frozen=True)
class ClassMetrics:
    """Scores of one class. Precision is NaN when the model never predicts the class, recall when it has
    no examples (sklearn's ``zero_division`` case, shown as 'n/a' rather than a misleading 0)."""

    index: int
    name: str
    precision: float
    recall: float
    f1: float
    support: int  # number of examples whose true class this is


@dataclass(frozen=True)
class ConfusedPair:
    """``count`` examples of class ``actual`` were predicted as ``predicted`` (fastai's most_confused)."""

    actual: str
    predicted: str
    count: int


@dataclass(frozen=True)
class TopLoss:
    """One of the examples the model got most wrong (highest cross-entropy)."""

    index: int  # position in the evaluated split
    actual: str
    predicted: str
    probability: float  # the model's probability of its prediction
    actual_probability: float  # the model's probability of the true class
    loss: float


@dataclass(frozen=True)
class Metrics:
    """Everything ``compute_metrics`` measures on one labelled set.

    Attributes:
        n: Number of examples.
        accuracy: Top-1 accuracy in [0, 1].
        loss: Mean cross-entropy (nats).
        top_k: {k: top-k accuracy} for each requested k smaller than the number of classes.
        confusion: int64 [K, K]; rows are true classes, columns predicted classes.
        per_class: Precision, recall, F1 and support of each class, in class order.
        most_confused: Off-diagonal confusion cells, largest first.
        top_losses: The highest-loss examples, largest first.
        classes: Class names, in label order.
    """

    n: int
    accuracy: float
    loss: float
    top_k: dict[int, float]
    confusion: np.ndarray
    per_class: list[ClassMetrics]
    most_confused: list[ConfusedPair]
    top_losses: list[TopLoss]
    classes: list[str]

    @property
    def macro_f1(self) -> float:
        """Mean F1 over the classes that have examples (NaN scores count as 0, as sklearn does)."""
        scores = [0.0 if math.isnan(c.f1) else c.f1 for c in self.per_class if c.support]
        return float(np.mean(scores)) if scores else float("nan")

    def summary(self) -> dict:
        """JSON-ready headline numbers."""
        return {"n": self.n, "accuracy": self.accuracy, "loss": self.loss,
                **{f"top{k}": v for k, v in self.top_k.items()}, "macro_f1": self.macro_f1}


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise DataError(f"logits [N, K] and labels [N] expected, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise DataError(f"labels must be in 0..{logits.shape[1] - 1}")


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> np.ndarray:
    """int64 [K, K] counts; entry [t, p] is the number of examples of true class t predicted as p."""
    flat = labels.long().cpu() * num_classes + preds.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of examples whose true class is among the k highest logits."""
    _check(logits, labels)
    if not len(labels):
        return float("nan")
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(1).float().mean().item()


def per_class_metrics(confusion: np.ndarray, classes: list[str]) -> list[ClassMetrics]:
    """Precision, recall and F1 of each class from a confusion matrix (rows true, columns predicted)."""
    tp = np.diag(confusion).astype(float)
    predicted = confusion.sum(0).astype(float)
    actual = confusion.sum(1).astype(float)
    out = []
    for i, name in enumerate(classes):
        p = tp[i] / predicted[i] if predicted[i] else float("nan")
        r = tp[i] / actual[i] if actual[i] else float("nan")
        f1 = 2 * p * r / (p + r) if (p + r) > 0 else (0.0 if not (math.isnan(p) or math.isnan(r)) else float("nan"))
        out.append(ClassMetrics(i, name, float(p), float(r), float(f1), int(actual[i])))
    return out


def most_confused(confusion: np.ndarray, classes: list[str], min_count: int = 1, limit: int = 10) -> list[ConfusedPair]:
    """Off-diagonal cells with at least ``min_count`` examples, largest first (ties: class order)."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    cells = [(int(off[t, p]), t, p) for t, p in zip(*np.nonzero(off >= max(1, min_count)))]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [ConfusedPair(classes[t], classes[p], c) for c, t, p in cells[:limit]]


def top_losses(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], k: int = 16) -> list[TopLoss]:
    """The ``k`` examples with the highest cross-entropy, largest first (fastai's top_losses)."""
    _check(logits, labels)
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    probs = logits.float().softmax(1)
    order = losses.argsort(descending=True)[:k]
    out = []
    for i in order.tolist():
        p = int(probs[i].argmax())
        out.append(TopLoss(i, classes[int(labels[i])], classes[p], float(probs[i, p]),
                           float(probs[i, labels[i]]), float(losses[i])))
    return out


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], *,
                    top_k: tuple[int, ...] = (3, 5), n_confused: int = 10, n_losses: int = 16) -> Metrics:
    """All metrics of a labelled set.

    Args:
        logits: float [N, K].
        labels: int [N], values in 0..K-1.
        classes: K class names.
        top_k: The k of the top-k accuracies to report (those >= K are skipped: they would be 1).
        n_confused: How many most-confused pairs to keep.
        n_losses: How many top-loss examples to keep.
    """
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    _check(logits, labels)
    if len(classes) != logits.shape[1]:
        raise DataError(f"{len(classes)} class names for {logits.shape[1]} logits")
    if not len(labels):
        raise DataError("no examples to evaluate")
    preds = logits.argmax(1)
    cm = confusion_matrix(labels, preds, len(classes))
    return Metrics(
        n=len(labels),
        accuracy=(preds == labels).float().mean().item(),
        loss=F.cross_entropy(logits, labels).item(),
        top_k={k: top_k_accuracy(logits, labels, k) for k in top_k if 1 < k < len(classes)},
        confusion=cm,
        per_class=per_class_metrics(cm, classes),
        most_confused=most_confused(cm, classes, limit=n_confused),
        top_losses=top_losses(logits, labels, classes, n_losses),
        classes=list(classes),
    )


def format_confusion(confusion: np.ndarray, classes: list[str]) -> str:
    """The confusion matrix as text, as the CIFAR tutorial prints it: one row per true class with its name,
    then the column numbers."""
    width = max(3, len(str(int(confusion.max()))) if confusion.size else 1)
    lines = [" ".join(f"{int(v):>{width}}" for v in row) + f"  ({i}) {name}" for i, (row, name) in
             enumerate(zip(confusion, classes))]
    lines.append(" ".join(f"{f'({i})':>{width}}" for i in range(len(classes))))
    return "\n".join(lines)


def format_per_class(per_class: list[ClassMetrics]) -> str:
    """A text table of per-class precision / recall / F1 / support."""
    w = max([5] + [len(c.name) for c in per_class])

    def fmt(v: float) -> str:
        return "  n/a" if math.isnan(v) else f"{v:.3f}"

    rows = [f"{'class':<{w}}  precision  recall     f1  support"]
    rows += [f"{c.name:<{w}}      {fmt(c.precision)}   {fmt(c.recall)}  {fmt(c.f1)}  {c.support:>7}" for c in per_class]
    return "\n".join(rows)
