"""cnnlab: train, evaluate, inspect, export and serve convolutional image classifiers."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The library's API, imported on first use (PEP 562): `import cnnlab` alone, and so `cnnlab --help` or
# `--version`, does not pay for importing torch (over a second).
_API = {
    "TrainConfig": "config", "list_recipes": "config", "load_recipe": "config", "resolve_config": "config",
    "list_datasets": "data", "load_dataset": "data",
    "CnnlabError": "errors",
    "evaluate": "infer", "load_trained": "infer",
    "create_model": "models", "list_models": "models", "register_model": "models",
    "Classifier": "train", "fit": "train", "make_optimizer": "train", "train_step": "train",
}

__all__ = [  # literal, so linters and type checkers see the names; a test checks it equals _API's keys
    "Classifier", "CnnlabError", "TrainConfig", "create_model", "evaluate", "fit", "list_datasets", "list_models",
    "list_recipes", "load_dataset", "load_recipe", "load_trained", "make_optimizer", "register_model",
    "resolve_config", "train_step",
]

if TYPE_CHECKING:
    from .config import TrainConfig, list_recipes, load_recipe, resolve_config
    from .data import list_datasets, load_dataset
    from .errors import CnnlabError
    from .infer import evaluate, load_trained
    from .models import create_model, list_models, register_model
    from .train import Classifier, fit, make_optimizer, train_step


def __getattr__(name: str):
    if name not in _API:  # a subpackage (`cnnlab.models`), as when this file imported them all
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
