"""Reuse freed host memory between training steps (glibc's malloc, CPU runs).

Why: a CPU training step allocates the same few hundred tensors of 1-30 MB every time
(activations and their gradients, the decoder's key/value cache, the packed decoding weights).
glibc's malloc serves a block above its mmap threshold (128 KiB at first, raised only as such
blocks are freed) with a fresh `mmap`, and hands the top of the heap back to the kernel once more
than its trim threshold (128 KiB at first) is free. So each step's tensors start on untouched pages
that the kernel must fault in and zero: 25-40 thousand page faults per step of
`benchmarks/throughput.py`'s model (100-160 MB), 5-8% of the step's time (see
`benchmarks/NOTES.md`). Fixing both thresholds keeps these blocks in the heap, where the next step
reuses them; peak memory stays the step's own peak, but the process keeps it between steps.

This is the same advice PyTorch gives for CPU performance (a caching allocator such as jemalloc or
tcmalloc through `LD_PRELOAD`), done in-process with `mallopt` so that it needs no launcher. It is
process-wide, so retrain applies it only when training on CPU, leaves it alone when the user has
tuned malloc themselves, and `RETRAIN_MALLOC_TUNING=0` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Optional

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest value glibc's dynamic threshold may reach by itself
TRIM_THRESHOLD = 1 * 2**30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_applied: Optional[bool] = None


def skip_reason(environ: Optional[dict[str, str]] = None) -> Optional[str]:
    """Why the tuning would not be applied in this process (None when it would)."""
    environ = os.environ if environ is None else environ
    if environ.get("RETRAIN_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return "RETRAIN_MALLOC_TUNING=0"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc's malloc"
    for name in _USER_SETTINGS:
        if environ.get(name):
            return f"{name} is set"
    if "malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc options"
    if "malloc" in environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc
        return "another malloc is preloaded"
    return None


def tune_malloc_for_reuse() -> bool:
    """Set glibc's mmap and trim thresholds so freed tensors' memory is reused (once per process).
    Returns whether the tuning is in effect."""
    global _applied
    if _applied is None:
        _applied = skip_reason() is None and _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return _applied


def _mallopt(parameter: int, value: int) -> bool:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)))
