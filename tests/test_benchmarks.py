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
    a profiled run whose table names the runtime's stages."""
    out = tmp_path / "fps.json"
    subprocess.run([sys.executable, "benchmarks/fps.py", "--backends", "eager", "--frames", "8",
                    "--runs", "1", "--no-real", "--expressions", "2", "--threads", "1",
                    "--profile", "--json", str(out)], check=True, cwd=ROOT, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["path"], r["expressions"]) for r in rows] == [
        ("reference", 1), ("eager", 1), ("reference", 2), ("eager", 2)]
    for r in rows:
        assert r["frames"] == 8 and r["fps"] > 0 and r["iou_min"] >= 0.99, r
        assert r["path"] == "reference" or "stage: propagation" in r["profile"], r
