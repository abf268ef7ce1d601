"""An Estimator-like API: ``Classifier(model="lenet5", model_dir="runs/x").train().evaluate().predict(...)``.

Like tf.estimator, a Classifier is tied to a model directory: ``train`` resumes from the newest checkpoint
there, and ``evaluate`` / ``predict`` use the best checkpoint when the run kept one (else the newest).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..config import resolve_config
from ..data import load_dataset
from ..data.images import as_batch
from ..rundir import read_record
from .loop import fit
from .restore import TrainedModel, load_trained
from .steps import evaluate, predict_logits, select_device


class Classifier:
    """Train, evaluate and predict with one model directory.

    Args:
        model: Registered model name (ignored when ``recipe`` names one and ``model`` is None).
        model_dir: The run directory (checkpoints, config, metrics). Defaults to ``runs/<model>``.
        recipe: A recipe name or TOML path to start from.
        dataset: Dataset name (mnist, fashion-mnist, cifar10, ...).
        data_dir: First place to look for dataset files.
        checkpoint: Which checkpoint evaluate/predict load: auto (best, else newest), latest, best or a file.
        **overrides: Any other TrainConfig field (lr=..., batch_size=..., steps=...).
    """

    def __init__(self, model: str | None = None, model_dir: str | Path | None = None, *, recipe: str | None = None,
                 dataset: str | None = None, data_dir: str | None = None, checkpoint: str = "auto", **overrides):
        given = {k: v for k, v in dict(model=model, dataset=dataset, **overrides).items() if v is not None}
        config_file = Path(model_dir) / "config.json" if model_dir else None
        if recipe is None and config_file is not None and config_file.is_file() and not given.keys() - {"model"}:
            # An existing run: carry on with its own config.
            self.config = resolve_config(None, read_record(config_file)["config"])
        else:
            self.config = resolve_config(recipe, given)
        self.model_dir = Path(model_dir or Path("runs") / self.config.model)
        self.data_dir = data_dir
        self.checkpoint = checkpoint
        self._trained: TrainedModel | None = None

    def train(self, steps: int | None = None, progress: bool | None = None, log=print) -> dict:
        """Train until ``steps`` in total (default: the config's), resuming if the directory has checkpoints.

        Returns the test metrics {'accuracy', 'loss', 'n'} at the end.
        """
        if steps is not None:
            self.config = replace(self.config, steps=steps, epochs=0.0)
        result = fit(self.config, self.model_dir, data_dir=self.data_dir, progress=progress, log=log)
        self._trained = None
        return result.test.as_dict()

    @property
    def trained(self) -> TrainedModel:
        if self._trained is None:
            self._trained = load_trained(self.model_dir, select_device(self.config.device), checkpoint=self.checkpoint)
        return self._trained

    def evaluate(self, split: str = "test") -> dict:
        """Accuracy and loss of the chosen checkpoint (see ``checkpoint``) on a split of the run's dataset."""
        t = self.trained
        ds = load_dataset(t.dataset or self.config.dataset, split, data_dir=self.data_dir)
        res = evaluate(t.model, ds.images, ds.labels, batch_size=self.config.eval_batch_size, tta=self.config.tta)
        return {**res.as_dict(), "split": split, "step": t.step}

    def predict_proba(self, images, invert: str = "auto", centre: bool = False) -> torch.Tensor:
        """Class probabilities [N, num_classes] for paths, PIL images, arrays or a tensor of images.

        ``invert`` and ``centre`` (frame a grayscale digit as MNIST does) are those of ``image_to_tensor``.
        """
        t = self.trained
        batch = as_batch(images, t.data_shape[0], tuple(t.data_shape[1:]), invert, centre)
        return torch.softmax(predict_logits(t.model, batch, tta=self.config.tta), 1)

    def predict(self, images, top_k: int = 3, invert: str = "auto", centre: bool = False) -> list[dict]:
        """One dict per image: predicted class index and label, its probability, the top-k, all probabilities."""
        probs = self.predict_proba(images, invert, centre)
        return describe_predictions(probs, self.trained.classes, top_k)


def describe_predictions(probs: torch.Tensor, classes: list[str], top_k: int = 3) -> list[dict]:
    """Turn probabilities [N, K] into readable dicts."""
    out = []
    k = max(1, min(top_k, probs.shape[1]))
    for p in probs:
        vals, idx = p.topk(k)
        out.append({"class": int(idx[0]), "label": classes[int(idx[0])], "probability": float(vals[0]),
                    "top_k": [{"class": int(i), "label": classes[int(i)], "probability": float(v)}
                              for v, i in zip(vals, idx)],
                    "probabilities": [float(v) for v in p]})
    return out
