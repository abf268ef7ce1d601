"""Facts recorded with every run: code version, library versions, hardware, threads."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from . import __version__
from .runtime import cpuinfo


def code_version() -> str:
    """The package version, plus the git commit (and '-dirty') when running from a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def cpu_name() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def run_info(device: torch.device, config=None) -> dict:
    """A JSON-able record of where and with what a run ran."""
    info = {"code_version": code_version(), "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if config is not None:
        info["seed"] = config.seed
    return info
