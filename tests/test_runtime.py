"""Process-level tuning done by the cnnlab command: glibc malloc keeps freed memory for reuse."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cnnlab import runtime

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


class FakeMallopt:
    """Stands in for a ctypes function: takes argtypes/restype, records its calls, answers ``result``."""

    def __init__(self, result: int):
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


class FakeLibc:
    """Stands in for ``ctypes.CDLL(None)``."""

    def __init__(self, result: int = 1):
        self.mallopt = FakeMallopt(result)

    @property
    def calls(self) -> list[tuple[int, int]]:
        return self.mallopt.calls


def _fake_libc(monkeypatch: pytest.MonkeyPatch, libc) -> list:
    """Route runtime's ``ctypes.CDLL(None)`` to ``libc``; returns the list of names CDLL was asked for."""
    opened = []

    def cdll(name):
        opened.append(name)
        if isinstance(libc, Exception):
            raise libc
        return libc

    monkeypatch.setattr(runtime.ctypes, "CDLL", cdll)
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.delenv("CNNLAB_MALLOC", raising=False)
    return opened


def test_tune_allocator_sets_both_thresholds(monkeypatch):
    libc = FakeLibc()
    _fake_libc(monkeypatch, libc)
    assert runtime.tune_allocator() is True
    # Both together: either alone turns off glibc's adaptive threshold without the benefit.
    assert libc.calls == [(M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30)]
    assert runtime.GLIBC_ENV == {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
    assert runtime.tune_allocator() is True and libc.calls[2:] == libc.calls[:2]  # again: the same values


@pytest.mark.parametrize("value", ["system", "SYSTEM"])
def test_cnnlab_malloc_system_opts_out(monkeypatch, value):
    opened = _fake_libc(monkeypatch, FakeLibc())
    monkeypatch.setenv("CNNLAB_MALLOC", value)
    assert runtime.tune_allocator() is False and opened == []  # the C library is not even looked at


def test_no_tuning_off_linux(monkeypatch):
    opened = _fake_libc(monkeypatch, FakeLibc())
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.tune_allocator() is False and opened == []


@pytest.mark.parametrize("libc", [FakeLibc(result=0), object(), OSError("no libc")],
                         ids=["mallopt refuses", "no mallopt (musl)", "no C library"])
def test_unavailable_or_refused_mallopt_is_a_quiet_no(monkeypatch, libc):
    _fake_libc(monkeypatch, libc)
    assert runtime.tune_allocator() is False


def test_cli_applies_the_tuning(monkeypatch):
    from cnnlab import cli

    calls = []
    monkeypatch.setattr(cli, "tune_allocator", lambda: calls.append(1) or True)
    assert cli.main(["recipes"]) == 0 and calls == [1]


# In a fresh process (runtime.py loaded alone, without torch): a 16 MiB block comes from mmap under glibc's
# defaults and from the heap once tuned. mallinfo2().hblks counts the mmapped blocks in use.
PROBE = textwrap.dedent("""
    import ctypes, importlib.util, sys
    spec = importlib.util.spec_from_file_location("runtime", sys.argv[1])
    runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    tuned = runtime.tune_allocator()
    before = libc.mallinfo2().hblks
    block = libc.malloc(16 << 20)
    print(tuned, libc.mallinfo2().hblks - before)
""")


def _glibc_with_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc_with_mallinfo2(),
                    reason="needs glibc >= 2.33 (mallinfo2)")
@pytest.mark.parametrize("env, want", [("", "True 0"), ("system", "False 1")])
def test_tuned_process_serves_large_blocks_from_the_heap(env, want):
    path = Path(runtime.__file__)
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CNNLAB_MALLOC": env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want
