"""Model zoo: importing this package registers every model."""

from . import seeds  # noqa: F401  (registers the tutorial models)
from .registry import CnnModel, ModelMeta, count_params, create_model, list_models, model_entry, register_model

__all__ = ["CnnModel", "ModelMeta", "count_params", "create_model", "list_models", "model_entry", "register_model"]
