"""Optional extras: check that an extra's packages are importable, else one clear line saying what to install."""

from __future__ import annotations

import importlib

from .errors import CnnlabError


def require_extra(modules: dict[str, str], extra: str, purpose: str) -> None:
    """Raise `CnnlabError` naming the missing packages of ``extra``.

    Args:
        modules: importable module name -> PyPI package name.
        extra: The pyproject extra that installs them (``pip install 'cnnlab[extra]'``).
        purpose: What needs them, for the message ("ONNX export").
    """
    missing = []
    for module, package in modules.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise CnnlabError(f"{purpose} needs {', '.join(missing)}: pip install 'cnnlab[{extra}]'")
