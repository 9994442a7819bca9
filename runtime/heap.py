"""glibc's allocator set for a run: freed buffers kept for the next frame, handed back after.

Every frame allocates and frees buffers of a few MiB (the decoded frame, its features,
the upsampled masks, the overlay). With glibc's defaults, or with its mmap threshold fixed
low, such blocks are mapped and unmapped, or trimmed off the heap's top, again and again:
each reuse pays a page fault per 4 KiB and the kernel's zeroing. A 795-frame 768x576 video
(`virst segment --backend onnxruntime`, masks, RLE and overlay; three runs each, in turn)
took 8.4-9.5 s of system time and 4.0-4.3 M page faults at 39.2 FPS (median) with the
threshold fixed at 1 MiB, as it was; with the larger thresholds 2.0-2.6 s, 0.25 M and
50.3 FPS, the same files (with the two-arena cap added after: 50.6 and 50.9). What is kept
is bounded by the run's own peak, not by the video's length, and `release_freed_memory`
hands it back when a run ends, so that a server's RSS does not creep over requests.
"""

from __future__ import annotations

import ctypes
import functools
import os

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# (mallopt parameter, value, the glibc variable through which a user's own setting wins).
# Blocks up to 32 MiB (glibc's largest threshold) come from the heap; 64 MiB of free top
# is kept during a run; the runtime's few threads share two arenas, since every arena
# keeps its own freed blocks (with glibc's 8 per core, a server's RSS grew 880 -> 1055 MB
# over 200 requests; with 2 it stayed flat).
KEPT_BLOCK = 32 << 20  # the largest block served from the heap and kept when freed
SETTINGS = (
    (M_MMAP_THRESHOLD, KEPT_BLOCK, "MALLOC_MMAP_THRESHOLD_"),
    (M_TRIM_THRESHOLD, 64 << 20, "MALLOC_TRIM_THRESHOLD_"),
    (M_ARENA_MAX, 2, "MALLOC_ARENA_MAX"),
)


@functools.cache  # loaded once: `release_freed_memory` runs at the end of every run
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Serve blocks up to 32 MiB from the heap, keep freed ones for reuse, in two arenas,
    for this process. True when every setting was applied; a setting the user made through
    glibc's variable is left as they made it, and where this is not glibc nothing is done."""
    libc = _libc()
    if libc is None:
        return False
    applied = [bool(libc.mallopt(param, value)) for param, value, variable in SETTINGS
               if variable not in os.environ]
    return len(applied) == len(SETTINGS) and all(applied)


def release_freed_memory() -> bool:
    """Hand every free page of every heap back to the system (glibc's malloc_trim)."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))
