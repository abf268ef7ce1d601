"""cnnlab: train, evaluate, inspect, export and serve convolutional image classifiers."""

__version__ = "0.1.0"

from .config import TrainConfig, list_recipes, load_recipe, resolve_config
from .data import list_datasets, load_dataset
from .errors import CnnlabError
from .infer import evaluate, load_trained
from .models import create_model, list_models, register_model
from .train import Classifier, fit, make_optimizer, train_step

__all__ = ["Classifier", "CnnlabError", "TrainConfig", "create_model", "evaluate", "fit", "list_datasets",
           "list_models", "list_recipes", "load_dataset", "load_recipe", "load_trained", "make_optimizer",
           "register_model", "resolve_config", "train_step"]
