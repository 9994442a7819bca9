"""The `virst` command, run as a user runs it (a real subprocess)."""

import subprocess
import sys

import numpy as np
from PIL import Image

from virst.media import write_video


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "virst.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_segment_writes_one_png_per_frame(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (9, 40, 56, 3), dtype=np.uint8)
    write_video(frames, tmp_path / "clip.mp4")
    res = run("segment", str(tmp_path / "clip.mp4"), "the red circle", "-o",
              str(tmp_path / "masks"))
    assert res.returncode == 0, res.stderr
    pngs = sorted((tmp_path / "masks").glob("*.png"))
    assert [p.stem for p in pngs] == [f"{i:05d}" for i in range(9)]
    with Image.open(pngs[0]) as im:
        assert im.size == (56, 40) and im.mode == "P"
    assert "segment" in res.stderr  # progress bar
    assert "9 frames in" in res.stdout


def test_errors_are_one_line_and_exit_2(tmp_path):
    res = run("segment", str(tmp_path / "none.mp4"), "the red circle", "-o", str(tmp_path))
    assert res.returncode == 2
    assert "virst: error: no such video or frame folder" in res.stderr
    assert "Traceback" not in res.stderr
    res = run("segment", str(tmp_path), "the red circle", "-o", str(tmp_path / "o"),
              "--model", str(tmp_path / "no-model"))
    assert res.returncode == 2 and "does not exist" in res.stderr
    assert not (tmp_path / "o").exists()


def test_info_prints_the_parameter_table():
    res = run("info", "--preset", "virst-7b")
    assert res.returncode == 0
    assert "8,202,971,571" in res.stdout and "SAM2 image encoder" in res.stdout


def test_demo_segments_a_shapes_clip_and_scores_it(tmp_path):
    """The README's main job: masks, overlays and a J&F the demo recomputes from its own
    ground truth (checked here against the written PNGs)."""
    import re

    from virst.cli import DEMO_EXPRESSION, DEMO_VIDEO
    from virst.data.shapes import make_video
    from virst.eval.metrics import sequence_jf
    from virst.media import read_mask

    res = run("demo", "-o", str(tmp_path))
    assert res.returncode == 0, res.stderr
    clip = make_video("valid", DEMO_VIDEO)
    pngs = sorted((tmp_path / "masks").glob("*.png"))
    assert len(pngs) == len(clip.frames)
    assert (tmp_path / "overlay.mp4").stat().st_size > 0
    with Image.open(tmp_path / "overlay.png") as im:
        assert im.size == (4 * clip.frames.shape[2], clip.frames.shape[1])
    _, objects, _ = clip.expressions[DEMO_EXPRESSION]
    pred = np.stack([read_mask(p) for p in pngs])
    jf = 100 * sequence_jf(clip.masks[objects].any(axis=0), pred)[2]
    printed = float(re.search(r"J&F ([\d.]+)", res.stdout).group(1))
    assert abs(printed - jf) < 0.06
    res = run("demo", "-o", str(tmp_path / "bad"), "--expression", "99")
    assert res.returncode == 2 and "out of range" in res.stderr
