"""Training: plain step functions, the loop, checkpoints and the Estimator-like Classifier."""

from .classifier import Classifier
from .loop import FitResult, fit
from .restore import TrainedModel, load_trained
from .steps import evaluate, make_optimizer, predict_logits, train_step

__all__ = ["Classifier", "FitResult", "TrainedModel", "evaluate", "fit", "load_trained", "make_optimizer",
           "predict_logits", "train_step"]
