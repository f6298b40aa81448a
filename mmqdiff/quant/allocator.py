"""glibc malloc settings for eager CPU inference and calibration: keep freed memory for reuse.

Eager PyTorch on the CPU allocates and frees megabyte-sized temporaries at every op. With glibc's defaults, blocks
above the (adaptive) mmap threshold are fresh ``mmap`` s, and the heap top is given back to the kernel as soon as it
is free, so the next step page-faults the same memory in again: on the 2-core CPU that is 14-25% of FP sampling time
and a few percent of the integer runtime's, and it makes a process's speed depend on what it ran before
(docs/benchmarks.md, "allocator"). Serving every block from the heap and never trimming it removes both; the
cost is that a process keeps its peak memory until it exits, which is what a sampling or calibration job does anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit: larger blocks still get their own mmap
OPT_OUT = "MMQDIFF_MALLOC_TUNING"


def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to its maximum and disable trimming, for this process; True when applied. A no-op
    (False) off Linux/glibc or when the environment sets ``MMQDIFF_MALLOC_TUNING=0``."""
    if os.environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
