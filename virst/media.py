"""Reading videos (frame folders, video files through PyAV, arrays) and writing masks.

Every failure is a `VideoError` that names the path and the problem; mask folders are
written to a temporary sibling first and moved into place whole.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from virst.errors import VideoError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# DAVIS-style palette PNG: index 0 background (black), index 1 the object (dark red).
DAVIS_PALETTE = [0, 0, 0, 128, 0, 0] + [0, 0, 0] * 254


@dataclass
class Video:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    names: list[str]  # one name per frame, used for output files

    def __len__(self) -> int:
        return self.frames.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return self.frames.shape[1], self.frames.shape[2]


def _frame_key(path: Path) -> tuple:
    numbers = re.findall(r"\d+", path.stem)
    return (int(numbers[-1]) if numbers else -1, path.stem)


def _read_folder(folder: Path) -> Video:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                   key=_frame_key)
    if not files:
        raise VideoError(f"no frames in folder {folder} (looked for {sorted(IMAGE_SUFFIXES)})")
    frames = []
    for f in files:
        try:
            with Image.open(f) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except (UnidentifiedImageError, OSError) as err:
            raise VideoError(f"cannot read frame {f}: {err}") from err
        if frames[-1].shape != frames[0].shape:
            raise VideoError(f"frame {f} is {frames[-1].shape[:2]}, earlier frames are "
                             f"{frames[0].shape[:2]}: all frames must have one size")
    return Video(np.stack(frames), [f.stem for f in files])


def frame_rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as (H, W, 3) uint8 RGB. One thread: by default swscale starts and
    stops its own threads for every frame (two per 768x576 frame here, with their stacks
    faulted in and released each time); the pixels are the same."""
    return frame.to_ndarray(format="rgb24", threads=1)


def _read_file(path: Path) -> Video:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path} has no video stream")
            frames = [frame_rgb(f) for f in container.decode(video=0)]
    except av.error.FFmpegError as err:
        raise VideoError(f"cannot decode video {path}: {err}") from err
    if not frames:
        raise VideoError(f"video {path} has no frames")
    return Video(np.stack(frames), [f"{i:05d}" for i in range(len(frames))])


def _from_array(array) -> Video:
    x = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise VideoError(f"a video array must be (T, H, W, 3) RGB, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise VideoError(f"the video array is empty: shape {x.shape}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating) or x.min() < 0 or x.max() > 1:
            raise VideoError(f"a video array must be uint8 or float in [0, 1], got {x.dtype}")
        x = np.round(x * 255).astype(np.uint8)
    return Video(np.ascontiguousarray(x), [f"{i:05d}" for i in range(x.shape[0])])


def load_video(source) -> Video:
    """A folder of frames (ordered by the number in their names), a video file, or an array."""
    if isinstance(source, Video):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise VideoError(f"no such video or frame folder: {path}")
        return _read_folder(path) if path.is_dir() else _read_file(path)
    return _from_array(source)


def write_video(frames: np.ndarray, path: str | Path, fps: float = 10,
                lossless: bool = False) -> None:
    """Encode (T, H, W, 3) uint8 frames as H.264; the file appears whole or not at all.
    Default yuv420p, which every player takes; `lossless` (yuv444p, crf 0) is for test
    fixtures that must decode to the same pixels."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        encoder = VideoEncoder(tmp, frames.shape[1:3], fps, lossless)
        for frame in frames:
            encoder.add(frame)
        encoder.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class VideoEncoder:
    """Frames in, H.264 out, one frame at a time. yuv420p needs even sizes: odd ones are
    padded by one edge pixel."""

    def __init__(self, path: Path, size: tuple[int, int], fps: float, lossless: bool = False):
        self.container = av.open(str(path), "w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=max(1, round(fps)))
        h, w = size
        self.pad = (0, 0) if lossless else (h % 2, w % 2)
        self.stream.height, self.stream.width = h + self.pad[0], w + self.pad[1]
        self.stream.pix_fmt = "yuv444p" if lossless else "yuv420p"
        self.stream.options = {"crf": "0" if lossless else "18"}

    def add(self, rgb: np.ndarray) -> None:
        if any(self.pad):
            rgb = np.pad(rgb, ((0, self.pad[0]), (0, self.pad[1]), (0, 0)), mode="edge")
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()

    def abort(self) -> None:
        self.container.close()


def write_mask_png(mask: np.ndarray, path: Path) -> None:
    """One mask as a DAVIS-style palette PNG (0 background, 1 object), 1 bit per pixel when
    it holds only 0 and 1: 4x faster to write than 8 bits (0.17 vs 0.73 ms at 640x272,
    0.38 vs 1.50 at 768x576, one rectangle) and 10x smaller; read back, the same palette
    image."""
    mask = np.asarray(mask, dtype=np.uint8)
    im = Image.fromarray(mask, mode="P")
    im.putpalette(DAVIS_PALETTE)
    im.save(path, **({"bits": 1} if mask.max(initial=0) <= 1 else {}))


def save_masks(masks: np.ndarray, names: list[str], out_dir: str | Path) -> list[Path]:
    """One DAVIS-style palette PNG per frame (0 background, 1 object), written atomically."""
    out = Path(out_dir)
    if len(masks) != len(names):
        raise ValueError(f"{len(masks)} masks for {len(names)} frame names")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for mask, name in zip(masks, names):
            write_mask_png(mask, tmp / f"{name}.png")
        out.mkdir(exist_ok=True)
        written = []
        for name in names:
            os.replace(tmp / f"{name}.png", out / f"{name}.png")
            written.append(out / f"{name}.png")
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_mask(path: str | Path) -> np.ndarray:
    """(H, W) bool from a mask PNG (any non-zero pixel is foreground)."""
    with Image.open(path) as im:
        return np.asarray(im) > 0


def overlay(frames: np.ndarray, masks: np.ndarray, color=(255, 40, 40),
            alpha: float = 0.55) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 with the masks (T, H, W) tinted in `color`, outlined."""
    import cv2

    out = frames.astype(np.float32).copy()
    tint = np.asarray(color, np.float32)
    for t, mask in enumerate(np.asarray(masks, bool)):
        out[t][mask] = (1 - alpha) * out[t][mask] + alpha * tint
        edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        out[t][edge] = tint
    return out.round().astype(np.uint8)


def contact_sheet(frames: np.ndarray, count: int = 4) -> np.ndarray:
    """`count` evenly spaced frames side by side, (H, count * W, 3)."""
    idx = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    return np.concatenate([frames[i] for i in idx], axis=1)
