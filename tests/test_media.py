import numpy as np
import pytest
import torch
from PIL import Image

from virst.errors import VideoError
from virst.media import load_video, read_mask, save_masks, write_mask_png, write_video


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
