"""Process-level performance settings that a library should not choose for its host, but the cnnlab CLI does.

glibc's malloc serves large blocks (over 128 KiB, a threshold it raises adaptively) with fresh ``mmap`` calls and
gives freed heap back to the kernel; each training step then touches newly mapped pages, and the kernel zero-fills
them one page fault at a time, every step, and in a VM faults are dear. Keeping freed memory in the process (as
jemalloc and tcmalloc do, which PyTorch's CPU tuning guide recommends preloading) removes nearly all of them; what
that buys is measured by benchmarks/cpu_tricks.py (figures in docs/speed.md). Library users opt in with
``tune_allocator()``.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for the mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed memory at the top of the heap before returning it
# The same settings as glibc environment variables, for processes cnnlab does not run (e.g. a peer framework)
GLIBC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity masks (macOS, Windows)
        return os.cpu_count() or 1


def tune_allocator() -> bool:
    """Make glibc malloc keep and reuse freed memory: mmap threshold 32 MiB, trim threshold 1 GiB.

    Both must be set together: setting either one switches off glibc's adaptive mmap threshold, and a trim
    threshold alone leaves every block over 128 KiB to mmap (slower still). Costs at most 1 GiB of retained heap.
    No-op (returns False) off Linux/glibc, when ``CNNLAB_MALLOC=system`` is set, or if mallopt refuses.
    Calling it again sets the same values again.
    """
    if os.environ.get("CNNLAB_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


LINEAR_BACKENDS = ("auto", "onednn", "torch")


def cpuinfo(key: str) -> str:
    """The first ``key`` field of /proc/cpuinfo (e.g. 'model name', 'vendor_id'); '' when there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def bf16_beats_fp32(device_type: str = "cpu") -> bool:
    """Whether bf16 runs faster than fp32 on this device: a CUDA GPU that supports it, a CPU with AMX-BF16, or an
    AMD CPU with AVX512-BF16 (measured on a Zen 5 EPYC: bf16 about twice fp32's FLOP/s).

    AVX512-BF16 alone does not make bf16 pay on Intel's CPUs: on an Emerald Rapids whose AMX its virtual machine
    hides, oneDNN's bf16 kernels ran at half fp32's FLOP/s and training was 1.2-1.6x slower in bf16 (docs/speed.md;
    Cooper Lake has the same instructions without AMX, not measured). Without any bf16 instructions, bf16 autocast
    is emulated and slower still. The choice depends on the machine only, never on a timing, so a rerun makes the
    same choice.
    """
    if device_type == "cuda":
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    flags = cpuinfo("flags").split()
    return "amx_bf16" in flags or ("avx512_bf16" in flags and cpu_vendor() == "AuthenticAMD")


def resolve_precision(precision: str, device_type: str = "cpu") -> str:
    """``precision`` with 'auto' replaced by what this device runs fastest: bf16 where `bf16_beats_fp32`, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_beats_fp32(device_type) else "fp32"


def cpu_vendor() -> str:
    """The CPU vendor string from /proc/cpuinfo (``GenuineIntel``, ``AuthenticAMD``, ...); '' when unknown."""
    return cpuinfo("vendor_id")


def linear_backend() -> str:
    """Which library runs fp32 ``nn.Linear`` layers on the CPU in training: 'onednn' or 'torch'.

    PyTorch's CPU wheels run fp32 matmuls through MKL, and MKL takes a generic AVX2 code path on CPUs that are not
    Intel's, well below what oneDNN reaches for the same product on the same CPU (figures in docs/speed.md).
    PyTorch also ships oneDNN (it already runs the convolutions and the bf16 matmuls). So 'auto' picks oneDNN on
    x86 CPUs from other vendors when PyTorch has both libraries, and leaves Intel CPUs (where MKL is fast) and
    everything else to torch. The choice depends on the machine only, never on a timing, so a rerun makes the same
    choice and the same numbers. ``CNNLAB_LINEAR=onednn|torch`` forces one.
    """
    from .errors import ConfigError

    want = os.environ.get("CNNLAB_LINEAR", "auto").strip().lower() or "auto"
    if want not in LINEAR_BACKENDS:
        raise ConfigError(f"CNNLAB_LINEAR must be one of {', '.join(LINEAR_BACKENDS)}, got {want!r}")
    import platform

    import torch

    has_onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if want == "torch" or not has_onednn:
        return "torch"
    if want == "onednn":
        return "onednn"
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkl.is_available():
        return "torch"
    return "onednn" if cpu_vendor() not in ("GenuineIntel", "") else "torch"
