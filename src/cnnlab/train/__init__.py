"""Training: plain step functions, the loop, checkpoints and the Estimator-like Classifier."""

from .classifier import Classifier
from .loop import FitResult, fit
from .steps import make_optimizer, train_step

__all__ = ["Classifier", "FitResult", "fit", "make_optimizer", "train_step"]
