"""The `virst` command, run as a user runs it (a real subprocess)."""

import json
import os
import socket
import subprocess
import sys

import av
import numpy as np
import pytest
from conftest import truncated_avi
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
    assert "segment" in res.stderr and "frame/s" in res.stderr  # progress bar with FPS
    assert "pass 1 (sampled frames):" in res.stderr  # progress before the first mask too
    assert "9 frames in" in res.stdout and "threads" in res.stdout


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    frames = np.random.default_rng(0).integers(0, 255, (6, 33, 47, 3), dtype=np.uint8)
    write_video(frames, path, lossless=True)  # odd size kept (yuv444p)
    return path


def test_outputs_are_checked_before_any_work(clip, tmp_path):
    """A file, an unwritable place, an existing non-empty folder: refused at once, nothing
    decoded, nothing written; the checks come before the video is even opened."""
    missing = str(tmp_path / "no-such-video.mp4")
    (tmp_path / "file").write_text("x")
    for out, message in [(tmp_path / "file", "is a file, not a folder"),
                         ("/sys/virst-test/masks", "is not writable")]:
        res = run("segment", missing, "the red circle", "-o", str(out))
        assert res.returncode == 2 and message in res.stderr, res.stderr
    res = run("segment", missing, "the red circle", "--overlay", str(tmp_path / "o.gif"))
    assert res.returncode == 2 and "give it a .m4v or .mp4 name, not o.gif" in res.stderr
    res = run("segment", missing, "  ", "-o", str(tmp_path / "o"))  # before the video
    assert res.returncode == 2 and "the expression is empty" in res.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "stale.png").write_bytes(b"old")
    res = run("segment", str(clip), "the red circle", "-o", str(full))
    assert res.returncode == 2 and "not empty" in res.stderr and "--overwrite" in res.stderr
    res = run("segment", str(clip), "the red circle", "-o", str(full), "--overwrite")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in full.iterdir()) == [f"{i:05d}.png" for i in range(6)]
    assert not (tmp_path / "o").exists()


def test_serve_settings_that_would_turn_every_request_away_are_refused_by_name():
    """Before: `virst serve --max-upload-mb -5` started and refused every upload."""
    for flag, value, message in [("--max-upload-mb", "-5", "must be positive, not -5.0"),
                                 ("--max-uploads", "0", "must be at least 1, not 0"),
                                 ("--max-frames", "0", "must be at least 1, not 0"),
                                 ("--max-megapixels", "nan", "must be positive, not nan"),
                                 ("--deadline-s", "0", "must be positive, not 0.0")]:
        res = run("serve", "--port", "0", flag, value)
        assert res.returncode == 2 and f"{flag} {message}" in res.stderr, (flag, res.stderr)
        assert "Traceback" not in res.stderr
    with socket.socket() as taken:  # a port in use: refused before the model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        res = run("serve", "--port", port, "--model", "/no/such/model")  # the port first
        assert res.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in res.stderr


def test_devices_and_options_are_named(clip, tmp_path):
    import torch

    cases = [("--device", "foo", "unknown device 'foo'"), ("--backend", "tpu", "unknown backend"),
             ("--precision", "fp8", "unknown precision")]
    if not torch.cuda.is_available():
        cases.append(("--device", "cuda", "no CUDA GPU is available"))
    for flag, value, message in cases:
        res = run("segment", str(clip), "the red circle", "-o", str(tmp_path / "o"), flag, value)
        assert res.returncode == 2 and message in res.stderr, (flag, res.stderr)
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_expressions_too_long_or_with_unknown_words(clip, tmp_path):
    res = run("segment", str(clip), "red " * 5000, "-o", str(tmp_path / "a"))
    assert res.returncode == 2 and "too long" in res.stderr and "4096" in res.stderr
    assert not (tmp_path / "a").exists()
    res = run("segment", str(clip), "the red zorblax", "-o", str(tmp_path / "b"))
    assert res.returncode == 0 and "'zorblax'" in res.stderr and "[UNK]" in res.stderr


def test_a_truncated_video_fails_or_warns_loudly(tmp_path):
    cut = truncated_avi(tmp_path, frames=40, keep=0.3)
    res = run("segment", str(cut), "the red circle", "-o", str(tmp_path / "o"))
    assert res.returncode == 2 and "cut short" in res.stderr and "declares 40" in res.stderr
    assert not (tmp_path / "o").exists()
    res = run("segment", str(cut), "the red circle", "-o", str(tmp_path / "o"),
              "--allow-truncated")
    assert res.returncode == 0 and "WARNING" in res.stderr
    assert 0 < len(list((tmp_path / "o").glob("*.png"))) < 40


def test_rle_overlay_and_several_expressions(clip, tmp_path):
    from pycocotools import mask as coco

    from virst.media import read_mask

    out = tmp_path / "o"
    res = run("segment", str(clip), "the red circle", "the blue square", "-o", str(out),
              "--rle", str(tmp_path / "m.json"), "--overlay", str(tmp_path / "o.mp4"),
              "--backend", "onnxruntime")
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["expressions"] == ["the red circle", "the blue square"]
    assert doc["size"] == [33, 47] and len(doc["frames"]) == 6
    for record in doc["frames"]:
        for m in record["masks"]:
            rle = {"size": m["rle"]["size"], "counts": m["rle"]["counts"].encode()}
            png = read_mask(out / str(m["expression"]) / f"{record['name']}.png")
            assert np.array_equal(coco.decode(rle).astype(bool), png)
    with av.open(str(tmp_path / "o.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.pix_fmt == "yuv420p"  # what every player takes
        assert sum(1 for _ in container.decode(stream)) == 6
    mode = 0o666 & ~current_umask()
    for path in (tmp_path / "m.json", tmp_path / "o.mp4"):
        assert os.stat(path).st_mode & 0o777 == mode


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_masks_are_staged_inside_the_output_folder(clip, tmp_path, monkeypatch):
    """-o at a mount point failed with "Invalid cross-device link" when masks were staged in
    the parent folder; every move now stays inside the output folder's own filesystem."""
    import runtime.writer as writer_mod
    from runtime.pipeline import Runtime
    from runtime.writer import MaskWriter

    moves = []
    real = os.replace
    monkeypatch.setattr(writer_mod.os, "replace",
                        lambda a, b: (moves.append((str(a), str(b))), real(a, b))[1])
    out = tmp_path / "mount-point"
    runtime = Runtime(threads=1)
    session = runtime.session(clip)
    with MaskWriter(["x"], session.source.size, folder=out) as writer:
        for frame in session.segment(["the red circle"]):
            writer.write(frame)
    assert len(moves) == 6
    assert all(a.startswith(str(out) + "/") and b.startswith(str(out) + "/") for a, b in moves)


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


def test_demo_segments_seeded_clips_and_scores_them(tmp_path):
    """The README's main job: clips drawn by the seed (not picked by hand), every expression
    of each, masks and overlays, and J&F values the demo recomputes from its own ground
    truth (checked here against the written PNGs)."""
    import re

    from virst.cli import demo_videos
    from virst.data.shapes import make_video
    from virst.eval.metrics import sequence_jf
    from virst.media import read_mask

    res = run("demo", "-o", str(tmp_path), "--seed", "3", "--clips", "1")
    assert res.returncode == 0, res.stderr
    (v,) = demo_videos(3, 1)
    assert demo_videos(3, 2) != demo_videos(4, 2)
    clip = make_video("valid", v)
    folder = tmp_path / f"valid-{v:02d}"
    printed = [float(x) for x in re.findall(r"^\s+J&F\s+([\d.]+)\s", res.stdout, re.M)]
    assert len(printed) == len(clip.expressions) > 1
    for e, (_, objects, _) in enumerate(clip.expressions):
        pngs = sorted((folder / "masks" / str(e)).glob("*.png"))
        assert len(pngs) == len(clip.frames)
        pred = np.stack([read_mask(p) for p in pngs])
        jf = 100 * sequence_jf(clip.masks[objects].any(axis=0), pred)[2]
        assert abs(printed[e] - jf) < 0.06
    assert (folder / "overlay.mp4").stat().st_size > 0
    with Image.open(folder / "overlay.png") as im:
        assert im.size == (4 * clip.frames.shape[2], clip.frames.shape[1])
    res = run("demo", "-o", str(tmp_path / "bad"), "--video", "99")
    assert res.returncode == 2 and "--video must be within" in res.stderr
