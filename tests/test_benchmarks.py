"""The benchmarks' own measurements (what their tables report must be the thing measured)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_worker_peak_rss_is_its_own_not_the_drivers():
    """fps.py measures each configuration in a child process; Linux carries ru_maxrss
    across exec, so a child spawned by a large driver reported the driver's size."""
    held = np.ones(300 * 2**20 // 8)  # the driver holds 300 MB while it spawns the worker
    code = "import json; from benchmarks.fps import peak_rss_mb; print(json.dumps(peak_rss_mb()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert held.sum() > 0
    assert json.loads(out) < 250  # numpy + the module: well under the driver's 300 MB


def test_fps_runs_every_path_and_compares_its_masks_with_the_reference(tmp_path):
    """`python benchmarks/fps.py` end to end on a short clip: one and two expressions on
    the reference and the eager runtime, each row timed and compared frame by frame, and
    a profiled run whose table names the runtime's stages, and the frames compiled in
    each timed run (a compiled row's first timed run on an H200 was 2.7x the others)."""
    out = tmp_path / "fps.json"
    subprocess.run([sys.executable, "benchmarks/fps.py", "--backends", "eager", "--frames", "8",
                    "--runs", "1", "--no-real", "--expressions", "2", "--threads", "1",
                    "--profile", "--json", str(out)], check=True, cwd=ROOT, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["path"], r["expressions"]) for r in rows] == [
        ("reference", 1), ("eager", 1), ("reference", 2), ("eager", 2)]
    for r in rows:
        assert r["frames"] == 8 and r["fps"] > 0 and r["iou_min"] >= 0.99, r
        assert r["compiled_frames"] == [0], r  # per timed run: nothing compiles here
        assert r["path"] == "reference" or "stage: propagation" in r["profile"], r


def test_the_profile_attributes_kernels_to_the_stage_that_launched_them():
    """fps.py's trace summary (a GPU's profiled run): the busy time is the union of the
    kernels' intervals (overlaps counted once), and a kernel counts against the stage range
    its launch lay in on the launching thread, even when it runs on the GPU later, inside
    another thread's range."""
    from benchmarks.fps import trace_summary

    def launch(tid, ts, corr):
        return {"cat": "cuda_runtime", "tid": tid, "ts": ts, "dur": 1,
                "args": {"correlation": corr}}

    def kernel(ts, dur, corr):
        return {"cat": "kernel", "ts": ts, "dur": dur, "args": {"correlation": corr}}

    events = [
        {"cat": "user_annotation", "name": "stage: image encoder", "tid": 1, "ts": 0,
         "dur": 100},
        {"cat": "user_annotation", "name": "stage: propagation", "tid": 2, "ts": 100,
         "dur": 100},
        launch(1, 10, 7), launch(2, 120, 8), launch(3, 130, 9),  # thread 3: no stage
        kernel(150, 2000, 7),  # launched in the encoder's range, runs during propagation's
        kernel(1000, 3000, 8),  # overlaps the one before: busy 150..4000
        kernel(5000, 1000, 9),
    ]
    text = trace_summary(events, wall=0.01)
    assert text.startswith("GPU busy 5 ms of the run's 10 ms (48 %), 3 kernels")
    rows = dict(line.rsplit(None, 1) for line in text.splitlines()[1:])
    assert {k.strip(): float(v) for k, v in rows.items()} == {
        "propagation": 3.0, "image encoder": 2.0, "(no stage)": 1.0}
