"""Model zoo: importing this package registers every model."""

from . import fast, seeds, spec, timm  # noqa: F401  (registers the models and the spec: and timm: prefixes)
from .registry import CnnModel, ModelMeta, count_params, create_model, list_models, model_entry, register_model

__all__ = ["CnnModel", "ModelMeta", "count_params", "create_model", "list_models", "model_entry", "register_model"]
