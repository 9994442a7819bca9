"""Flat memory over many runs in one process (a server, a benchmark's repeated runs).

glibc serves an allocation above its mmap threshold with a mapping of its own, handed back
to the system when freed, but it raises the threshold to the size of every such block
freed (up to 32 MiB). Frames, features and activations of a few MiB then come from the
heap, whose freed holes stay resident: the same 1024-frame 768x576 run repeated in one
process ended at 1024, 1314, 1351 and 1358 MB RSS (ONNX Runtime, embedded model). With
the threshold fixed at 1 MiB (what the MALLOC_MMAP_THRESHOLD_ variable sets): 879, 1006,
1003 and 1004 MB.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
THRESHOLD = 1 << 20


def fix_mmap_threshold(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes, for this process. False where it
    does not apply: not glibc, or MALLOC_MMAP_THRESHOLD_ set by the user (theirs wins)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
