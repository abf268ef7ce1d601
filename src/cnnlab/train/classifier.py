"""An Estimator-like API: ``Classifier(model="lenet5", model_dir="runs/x").train().evaluate().predict(...)``.

Like tf.estimator, a Classifier is tied to a model directory: ``train`` resumes from the newest checkpoint
there, and ``evaluate`` / ``predict`` use the best checkpoint when the run kept one (else the newest).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..config import resolve_config
from ..errors import ConfigError
from ..infer import TrainedModel, load_trained, select_device
from ..rundir import read_record
from .loop import fit


class Classifier:
    """Train, evaluate and predict with one model directory.

    Args:
        model: Registered model name (ignored when ``recipe`` names one and ``model`` is None). For a
            ``model_dir`` that already holds a run, it must be that run's model (ConfigError otherwise).
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
        saved = read_record(config_file)["config"] if config_file and config_file.is_file() else None
        if saved is not None and model is not None and model != saved.get("model"):
            raise ConfigError(f"{model_dir} holds a {saved.get('model')} run, not {model}; "
                              "use another model_dir or leave out model=")
        if recipe is None and saved is not None and not given.keys() - {"model"}:
            self.config = resolve_config(None, saved)  # an existing run: carry on with its own config
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

    def evaluate(self, split: str = "test", tta: str | None = None) -> dict:
        """Accuracy and loss of the chosen checkpoint (see ``checkpoint``) on a split of the run's dataset,
        computed as the training loop's own evaluation (recorded precision, layout, TTA and crop).

        ``tta``: evaluate with these test-time views instead of the recorded ones (one of `config.TTA_MODES`), to
        see what they add; the result's "tta" names the views used.
        """
        res = self.trained.evaluate_split(split, self.data_dir, tta)
        return {**res.as_dict(), "split": split, "step": self.trained.step,
                "tta": self.trained.tta_mode(tta)}

    def predict_proba(self, images, invert: str | None = None, centre: bool = False) -> torch.Tensor:
        """Class probabilities [N, num_classes] for paths, PIL images, arrays or a tensor of images.

        ``invert`` ('auto' | 'yes' | 'no') overrides the polarity the run recorded (None: as recorded);
        ``centre`` frames a grayscale digit as MNIST does (see ``image_to_tensor``).
        """
        return self.trained.predict_proba(images, invert, centre)

    def predict(self, images, top_k: int = 3, invert: str | None = None, centre: bool = False) -> list[dict]:
        """One dict per image: predicted class index and label, its probability, the top-k, all probabilities."""
        return self.trained.predict(images, top_k, invert, centre)
