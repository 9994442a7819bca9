"""`runtime.heap`: with `keep_freed_memory`, a buffer of a few MiB freed and allocated again
costs no page faults (with the mmap threshold fixed at 1 MiB, as the user may still ask
through glibc's variable, it costs one per 4 KiB page each time); threads share at most two
arenas; `release_freed_memory` hands what was kept back; a session's run ends by releasing
it. Each allocator case in a fresh process (the settings are process-wide)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime.session as session_mod
from runtime.pipeline import Runtime
from virst.data.shapes import make_video

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 8 << 20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

PROBE = """
import ctypes, resource, sys
from runtime.heap import keep_freed_memory, release_freed_memory

def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

print("kept", keep_freed_memory())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = int(sys.argv[1])

def cycle():  # a frame's buffer: allocated, written, freed
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)

cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    cycle()
print("faults", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 8)
block = libc.malloc(size)
ctypes.memset(block, 1, size)
pin = libc.malloc(64)  # keeps the heap's top above the block
libc.free(block)
held = rss_kb()
print("released", release_freed_memory(), held - rss_kb())
"""


ARENAS = """
import ctypes, sys, tempfile, threading
from runtime.heap import keep_freed_memory

if sys.argv[1] == "kept":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
alive = threading.Barrier(8)

def work():
    block = libc.malloc(1 << 20)  # from this thread's arena
    alive.wait()  # all eight at once: glibc's default gives each its own
    libc.free(block)

threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
    fp = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    print(open(f.name).read().count("<heap nr="))
"""


def _run(code: str, *args: str, **env) -> str:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          check=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"], **env}).stdout


def _probe(**env) -> dict:
    lines = dict(line.split(" ", 1) for line in _run(PROBE, str(BLOCK), **env).splitlines())
    released = lines["released"].split()
    return {"kept": lines["kept"] == "True", "faults": int(lines["faults"]),
            "released": released[0] == "True", "released_kb": int(released[1])}


@linux_only
def test_kept_memory_is_reused_without_page_faults_and_released_after():
    kept = _probe()
    assert kept["kept"]
    assert kept["faults"] < 64, kept  # 2048 pages a cycle if each block were mapped anew
    assert kept["released"] and kept["released_kb"] >= (BLOCK >> 10) * 3 // 4, kept


@linux_only
def test_the_users_glibc_settings_win():
    """MALLOC_MMAP_THRESHOLD_=1MiB: left as set, and every cycle faults its pages in again
    (what the runtime did before; the measurement above can fail)."""
    theirs = _probe(MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    assert not theirs["kept"]
    assert theirs["faults"] >= (BLOCK >> 12) * 3 // 4, theirs


@linux_only
def test_threads_share_two_arenas():
    """Every arena keeps its own freed blocks: with glibc's default of 8 per core a server's
    RSS grew 880 -> 1055 MB over 200 requests (benchmarks/serve_load.py); capped, flat."""
    assert int(_run(ARENAS, "kept")) <= 2
    assert int(_run(ARENAS, "default")) > 2  # the cap is what keeps them few


def test_a_run_hands_kept_memory_back_when_it_ends(tiny_dir, monkeypatch):
    """Once when every frame was read, once when the reader stops early."""
    released = []
    monkeypatch.setattr(session_mod, "release_freed_memory", lambda: released.append(1))
    frames = make_video("valid", 0).frames[:12]
    runtime = Runtime(tiny_dir, backend="eager", threads=1)
    masks = [f.masks for f in runtime.session(frames).segment(["the red circle"])]
    assert len(masks) == len(frames) and released == [1]
    run = runtime.session(frames).segment(["the red circle"])
    assert np.array_equal(next(run).masks, masks[0]) and released == [1]
    run.close()
    assert released == [1, 1]
