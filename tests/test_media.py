import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from virst.errors import VideoError
from virst.media import frame_rgb, load_video, read_mask, save_masks, write_mask_png, write_video

ROOT = Path(__file__).resolve().parent.parent


def _frames(t=5, h=24, w=32):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (t, h, w, 3), dtype=np.uint8)


def test_folder_frames_are_ordered_by_the_number_in_their_names(tmp_path):
    frames = _frames()
    for i, name in enumerate(["img_1", "img_2", "img_10", "img_11", "img_100"]):
        Image.fromarray(frames[i]).save(tmp_path / f"{name}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    video = load_video(tmp_path)
    assert video.names == ["img_1", "img_2", "img_10", "img_11", "img_100"]
    assert np.array_equal(video.frames, frames)


def test_video_file_round_trip(tmp_path):
    frames = _frames(t=6, h=32, w=48)
    write_video(frames, tmp_path / "v.mp4", lossless=True)
    video = load_video(tmp_path / "v.mp4")
    assert video.frames.shape == frames.shape and len(video.names) == 6
    assert np.abs(video.frames.astype(int) - frames).mean() < 3  # near-lossless H.264


def test_arrays_and_tensors():
    frames = _frames()
    assert np.array_equal(load_video(frames).frames, frames)
    assert np.array_equal(load_video(torch.from_numpy(frames)).frames, frames)
    floats = load_video(frames.astype(np.float32) / 255)
    assert np.array_equal(floats.frames, frames)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
    (np.zeros((4, 8, 8), np.uint8), r"\(T, H, W, 3\)"),
    (np.full((2, 8, 8, 3), 7.0), r"uint8 or float in \[0, 1\]"),
])
def test_bad_arrays(bad, match):
    with pytest.raises(VideoError, match=match):
        load_video(bad)


def test_bad_paths(tmp_path):
    with pytest.raises(VideoError, match="no such video"):
        load_video(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="no frames in folder"):
        load_video(tmp_path / "empty")
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 10)
    with pytest.raises(VideoError, match="cannot decode video"):
        load_video(tmp_path / "junk.mp4")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "0.png").write_bytes(b"broken png")
    with pytest.raises(VideoError, match="cannot read frame"):
        load_video(tmp_path / "frames")


def test_masks_are_davis_palette_pngs_written_whole(tmp_path):
    masks = np.zeros((3, 10, 12), bool)
    masks[1, 2:5, 3:7] = True
    paths = save_masks(masks.astype(np.uint8), ["a", "b", "c"], tmp_path / "out")
    assert [p.name for p in paths] == ["a.png", "b.png", "c.png"]
    with Image.open(paths[1]) as im:
        assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]
        assert set(np.unique(np.asarray(im))) == {0, 1}
    assert np.array_equal(read_mask(paths[1]), masks[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial folder left
    with pytest.raises(ValueError):
        save_masks(masks, ["a"], tmp_path / "other")
    assert not (tmp_path / "other").exists()
    labels = masks[1].astype(np.uint8) * 2  # more than 0/1: 8 bits, the values kept
    write_mask_png(labels, tmp_path / "labels.png")
    with Image.open(tmp_path / "labels.png") as im:
        assert np.array_equal(np.asarray(im), labels)


CLONES = """
import sys, av
from virst.media import frame_rgb
with av.open(sys.argv[1]) as container:
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1
    for frame in container.decode(stream):
        frame_rgb(frame) if sys.argv[2] == "ours" else frame.to_ndarray(format="rgb24")
"""


def _threads_started(video, how: str) -> int:
    """Threads a decode of `video` starts, counted by strace (clone/clone3 calls)."""
    log = video.with_suffix(f".{how}.strace")
    subprocess.run(["strace", "-f", "-e", "trace=clone,clone3", "-o", str(log), sys.executable,
                    "-c", CLONES, str(video), how], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return sum("clone" in line and "resumed" not in line for line in log.read_text().splitlines())


def test_decoded_frames_convert_on_one_thread_to_the_same_pixels(tmp_path):
    """`frame_rgb` gives the pixels of PyAV's default conversion, without the threads that
    swscale otherwise starts and stops for every frame (measured: two per 768x576 frame
    on 2 cores)."""
    frames = _frames(t=12, h=576, w=768)
    write_video(frames, tmp_path / "v.mp4")
    with av.open(str(tmp_path / "v.mp4")) as container:
        for frame in container.decode(video=0):
            assert np.array_equal(frame_rgb(frame), frame.to_ndarray(format="rgb24"))
    if shutil.which("strace") is None:
        pytest.skip("strace counts the threads")
    assert _threads_started(tmp_path / "v.mp4", "ours") <= 2
    if os.cpu_count() > 1:
        assert _threads_started(tmp_path / "v.mp4", "default") >= len(frames)
