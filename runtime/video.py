"""Streaming video input: a probe, a first pass that yields only the frames the VLM and the
segmentation stage sample, and a second pass that yields every frame in order, both one
frame at a time.

Files (PyAV), frame folders and in-memory arrays share one interface. Everything that can
be checked before the work starts is checked in `open_video`: an unreadable or empty video,
frames of different sizes, and a file whose container declares more frames than it holds
(cut short) are refused there, naming the problem, not after minutes of segmenting.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from virst.errors import VideoError
from virst.media import IMAGE_SUFFIXES, Video, _frame_key, frame_rgb, load_video


@dataclass
class VideoSource:
    """A video of `length` frames of `height` x `width`, named `names` (output files)."""

    label: str
    length: int
    height: int
    width: int
    names: list[str]
    fps: float = 10.0
    _frames: np.ndarray | None = field(default=None, repr=False)  # in-memory videos
    _files: list[Path] | None = field(default=None, repr=False)  # frame folders
    _path: Path | None = field(default=None, repr=False)  # video files
    decode_threads: int = 1

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    # ------------------------------------------------------------------ passes
    def sampled(self, indices) -> Iterator[tuple[int, np.ndarray]]:
        """Pass 1: the frames at `indices` in order, one at a time (a file is decoded
        whole, so that one cut short is found here, but only these frames become RGB)."""
        wanted = set(int(i) for i in indices)
        if self._frames is not None:
            yield from ((i, self._frames[i]) for i in sorted(wanted))
        elif self._files is not None:
            yield from ((i, _read_image(self._files[i], self.size)) for i in sorted(wanted))
        else:
            yield from ((t, frame) for t, frame in self._decode(keep=wanted) if t in wanted)

    def read(self, indices) -> dict[int, np.ndarray]:
        """The frames at `indices`, all at once (`read([])` checks that every frame decodes)."""
        return dict(self.sampled(indices))

    def frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """Pass 2: every frame in order, (index, (H, W, 3) uint8 RGB)."""
        if self._frames is not None:
            yield from enumerate(self._frames)
        elif self._files is not None:
            for t, path in enumerate(self._files):
                yield t, _read_image(path, self.size)
        else:
            yield from self._decode(keep=None)

    def _decode(self, keep: set | None) -> Iterator[tuple[int, np.ndarray | None]]:
        """Decode the file; frames outside `keep` (None: all) are not converted to RGB.
        A decode error or a video that ends before `length` frames is a VideoError."""
        t = 0
        try:
            with av.open(str(self._path)) as container:
                stream = container.streams.video[0]
                stream.codec_context.thread_count = self.decode_threads
                if self.decode_threads > 1:  # frame threads as well as slices
                    stream.thread_type = "AUTO"
                for frame in container.decode(stream):
                    if t >= self.length:
                        break
                    if (frame.height, frame.width) != self.size:  # before converting it
                        raise VideoError(f"{self.label}: frame {t} is {frame.width}x"
                                         f"{frame.height}, the video is {self.width}x"
                                         f"{self.height}")
                    if keep is None or t in keep:
                        yield t, frame_rgb(frame)
                    else:
                        yield t, None
                    t += 1
        except av.error.FFmpegError as err:
            raise VideoError(f"{self.label}: decoding failed at frame {t} of {self.length}: "
                             f"{err}") from err
        if t < self.length:
            raise VideoError(f"{self.label}: the video ended after {t} of its {self.length} "
                             f"frames (corrupt or cut short)")


UNREADABLE = (UnidentifiedImageError, Image.DecompressionBombError, OSError)


def _read_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A frame of `size`, which its header must declare before anything is decoded."""
    try:
        with Image.open(path) as im:
            if im.size[::-1] != size:
                raise VideoError(f"frame {path} is {im.size[0]}x{im.size[1]}, earlier frames "
                                 f"are {size[1]}x{size[0]}: all frames must have one size")
            return np.asarray(im.convert("RGB"))
    except UNREADABLE as err:
        raise VideoError(f"cannot read frame {path}: {err}") from err


# -------------------------------------------------------------------------- probing


def _probe_file(path: Path, allow_truncated: bool) -> VideoSource:
    """Frame count by demuxing (no decoding), size, frame rate; a file with fewer frames
    than its container declares is refused (or, when allowed, announced loudly)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path} has no video stream")
            stream = container.streams.video[0]
            declared = _declared_frames(stream)
            count = sum(1 for p in container.demux(stream) if p.size > 0)
            height, width = stream.codec_context.height, stream.codec_context.width
            fps = float(stream.average_rate or stream.guessed_rate or 10)
    except av.error.FFmpegError as err:
        raise VideoError(f"cannot read video {path}: {err}") from err
    if count == 0 or not height or not width:
        raise VideoError(f"video {path} has no frames")
    if declared and count < declared:
        message = (f"{path} looks cut short: its container declares {declared} frames, only "
                   f"{count} are there")
        if not allow_truncated:
            raise VideoError(message + "; pass --allow-truncated to segment what is there")
        print(f"WARNING: {message}; segmenting those {count} frames (--allow-truncated)",
              file=sys.stderr)
    names = [f"{i:05d}" for i in range(count)]
    return VideoSource(str(path), count, height, width, names, fps, _path=path)


def _declared_frames(stream) -> int:
    """Frames the container declares: its frame count, else duration x frame rate."""
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.time_base and stream.average_rate:
        return int(round(float(stream.duration * stream.time_base * stream.average_rate)))
    return 0


def _probe_folder(folder: Path) -> VideoSource:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                   key=_frame_key)
    if not files:
        raise VideoError(f"no frames in folder {folder} (looked for {sorted(IMAGE_SUFFIXES)})")
    try:
        with Image.open(files[0]) as im:
            width, height = im.size
    except UNREADABLE as err:
        raise VideoError(f"cannot read frame {files[0]}: {err}") from err
    return VideoSource(str(folder), len(files), height, width, [f.stem for f in files],
                       _files=files)


def open_video(source, allow_truncated: bool = False) -> VideoSource:
    """A video file, a frame folder, an (T, H, W, 3) array or a `Video`, probed."""
    if isinstance(source, VideoSource):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise VideoError(f"no such video or frame folder: {path}")
        return _probe_folder(path) if path.is_dir() else _probe_file(path, allow_truncated)
    video = source if isinstance(source, Video) else load_video(source)
    return VideoSource("array", len(video), *video.size, list(video.names),
                       _frames=video.frames)
