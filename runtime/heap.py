"""glibc's allocator set for a run: freed buffers kept for the next frame, handed back after.

Every frame allocates and frees buffers of a few MiB (the decoded frame, its features,
the upsampled masks, the overlay). With glibc's defaults, or with its mmap threshold fixed
low, such blocks are mapped and unmapped, or trimmed off the heap's top, again and again:
each reuse pays a page fault per 4 KiB and the kernel's zeroing. A 795-frame 768x576 video
(`virst segment --backend onnxruntime`, masks, RLE and overlay; three runs each, in turn)
took 8.4-9.5 s of system time and 4.0-4.3 M page faults at 39.2 FPS (median) with the
threshold fixed at 1 MiB, as it was; with these settings 2.0-2.6 s, 0.25 M and 50.3 FPS,
the same files. What is kept is bounded by the run's own peak, not by the video's length, and
`release_freed_memory` hands it back when a run ends, so that a server's RSS does not
creep over requests.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to it come from the heap
TRIM_THRESHOLD = 64 << 20  # free memory the heap's top keeps during a run
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Serve blocks up to MMAP_THRESHOLD from the heap and keep freed ones for reuse, for
    this process. False where it does not apply: not glibc, or the user set glibc's
    MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ (theirs win)."""
    libc = _libc()
    if libc is None or any(name in os.environ for name in USER_SETTINGS):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_freed_memory() -> bool:
    """Hand every free page of every heap back to the system (glibc's malloc_trim)."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))
