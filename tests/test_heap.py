"""`runtime.heap.fix_mmap_threshold`: after glibc has raised its mmap threshold (a large
block freed), a freed block of a few MiB stays resident without the fix and goes back to
the system with it. Each case in a fresh process (the threshold is process-wide)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import ctypes, sys
from runtime.heap import fix_mmap_threshold

def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(16 << 20))  # unfixed, this raises the threshold to 16 MiB
block = libc.malloc(4 << 20)
ctypes.memset(block, 1, 4 << 20)
pin = libc.malloc(64)  # keeps the heap's top above the block
before = rss_kb()
libc.free(block)
print(before - rss_kb())
"""


def _released_kb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_fixed_mmap_threshold_hands_freed_blocks_back():
    assert _released_kb("dynamic") < 1024  # the 4 MiB stayed resident
    assert _released_kb("fixed") >= 3 * 1024
