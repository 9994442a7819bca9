"""Writing masks as they come: a PNG folder, COCO RLE (pycocotools) as JSON, an overlay
video; on a writer thread when asked (`background`: the frame loop hands each frame over and
goes on; a bounded queue keeps memory flat; an error there is raised in the caller).

Every output is staged on its own filesystem (a hidden folder inside the output folder, a
hidden file beside each output file) and moved into place only when the whole video is
done; an error removes the staging and leaves the outputs as they were.

Checked before any work (`MaskWriter.__init__`): the output folder is not a file, is
writable, and is empty unless `overwrite` (which then replaces its masks whole).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

from virst.errors import InputError
from virst.files import public_mode
from virst.media import VideoEncoder, write_mask_png

WRITE_AHEAD = 16  # frames queued for the writer thread, at most
OVERLAY_SUFFIXES = {".mp4", ".m4v"}  # the overlay is written as an MP4 file (virst/media.py)
_END = object()

COLORS = [(255, 40, 40), (40, 200, 255), (60, 220, 60), (255, 200, 0), (220, 80, 255)]


@dataclass
class FrameMasks:
    """One frame's result: masks (E, H, W) bool and object scores (E,) in [0, 1]."""

    index: int
    name: str
    masks: np.ndarray
    scores: np.ndarray
    frame: np.ndarray | None = None  # (H, W, 3) RGB, kept only when an overlay is written


def rle(mask: np.ndarray) -> dict:
    """COCO run-length encoding of an (H, W) mask, counts as a string (JSON-ready)."""
    enc = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in enc["size"]], "counts": enc["counts"].decode("ascii")}


def frame_record(fm: FrameMasks) -> dict:
    """The per-frame record of `--rle` files and the server's stream."""
    return {"frame": fm.index, "name": fm.name,
            "masks": [{"expression": i, "rle": rle(m), "score": round(float(s), 4)}
                      for i, (m, s) in enumerate(zip(fm.masks, fm.scores))]}


def _writable_dir(folder: Path, what: str) -> None:
    """Refuse a file, or a folder (or its nearest existing parent) we cannot create files in;
    tried for real, since permission bits say nothing for root or on read-only mounts."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {folder} is a file, not a folder")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{what} {folder}: {probe} is a file, not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".virst-probe-", dir=probe)).rmdir()
    except OSError as err:
        raise InputError(f"{what} {folder} is not writable ({probe}: "
                         f"{err.strerror or err})") from err


def _is_mask_entry(path: Path) -> bool:
    return (path.suffix == ".png" and path.is_file()) or (path.is_dir() and path.name.isdigit())


class MaskWriter:
    def __init__(self, expressions: list[str], size: tuple[int, int], *, folder=None,
                 rle_path=None, overlay_path=None, fps: float = 10.0, overwrite: bool = False,
                 label: str = "", background: bool = False):
        self.expressions, self.size = list(expressions), size
        self.folder = Path(folder) if folder else None
        self.rle_path = Path(rle_path) if rle_path else None
        self.overlay_path = Path(overlay_path) if overlay_path else None
        self.overwrite, self.fps, self.label = overwrite, fps, label
        self._check()
        self._created, self._stage = [], None
        self._rle_file = self._video = None
        self.frames_written = 0
        self.seconds = 0.0  # spent writing (on the writer thread when `background`)
        self.background = background
        self._queue = self._thread = self._failure = None
        self._discard = False

    @property
    def wants_frames(self) -> bool:
        return self.overlay_path is not None

    # ----------------------------------------------------------------- checks
    def _check(self) -> None:
        if not (self.folder or self.rle_path or self.overlay_path):
            raise InputError("no output asked for: give a mask folder, --rle or --overlay")
        if self.folder:
            _writable_dir(self.folder, "output folder")
            if self.folder.is_dir() and not self.overwrite:
                entries = [p for p in self.folder.iterdir() if not p.name.startswith(".")]
                if entries:
                    raise InputError(f"output folder {self.folder} is not empty ({len(entries)} "
                                     f"entries, e.g. {entries[0].name}); pass --overwrite to "
                                     f"replace its masks")
        for path in (self.rle_path, self.overlay_path):
            if path is not None:
                if path.is_dir():
                    raise InputError(f"{path} is a folder; give a file name")
                _writable_dir(path.parent, "folder of")
        if self.overlay_path and self.overlay_path.suffix.lower() not in OVERLAY_SUFFIXES:
            # the file is H.264 in MP4 whatever its name: "overlay.gif" was an MP4 no viewer
            # of GIFs opens
            raise InputError(f"--overlay writes an H.264 MP4 video: give it a "
                             f"{' or '.join(sorted(OVERLAY_SUFFIXES))} name, not "
                             f"{self.overlay_path.name}")

    # ---------------------------------------------------------------- writing
    def open(self) -> MaskWriter:
        if self.folder:
            if not self.folder.exists():
                self.folder.mkdir(parents=True)
                self._created.append(self.folder)
            self._stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.folder))
            if len(self.expressions) > 1:
                for i in range(len(self.expressions)):
                    (self._stage / str(i)).mkdir()
        if self.rle_path:
            self._rle_tmp = self._partial(self.rle_path)
            self._rle_file = open(self._rle_tmp, "w")
            head = {"video": self.label, "expressions": self.expressions,
                    "size": list(self.size)}
            self._rle_file.write(json.dumps(head)[:-1] + ', "frames": [\n')
        if self.overlay_path:
            self._video_tmp = self._partial(self.overlay_path)
            self._video = VideoEncoder(self._video_tmp, self.size, self.fps)
        if self.background:
            self._queue, self._discard = queue.Queue(WRITE_AHEAD), False
            self._thread = threading.Thread(target=self._drain, name="virst-writer",
                                            daemon=True)
            self._thread.start()
        return self

    @staticmethod
    def _partial(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
        os.close(fd)
        return Path(name)

    def write(self, fm: FrameMasks) -> None:
        """Write one frame's outputs, or hand them to the writer thread (which raises its
        error here, at the next frame, or at `commit`)."""
        if self._thread is None:
            self._write_now(fm)
            return
        self._raise_failure()
        self._queue.put(fm)  # blocks while WRITE_AHEAD frames wait: memory stays flat

    def _drain(self) -> None:
        while (fm := self._queue.get()) is not _END:
            if self._failure is None and not self._discard:
                try:
                    self._write_now(fm)
                except BaseException as err:  # raised in the caller's thread
                    self._failure = err

    def _join(self) -> None:
        if self._thread is not None:
            self._queue.put(_END)
            self._thread.join()
            self._thread = None

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _write_now(self, fm: FrameMasks) -> None:
        start = time.perf_counter()
        if self._stage is not None:
            many = len(self.expressions) > 1
            for i, mask in enumerate(fm.masks):
                write_mask_png(mask, self._stage / (f"{i}/{fm.name}.png" if many
                                                    else f"{fm.name}.png"))
        if self._rle_file is not None:
            sep = ",\n" if self.frames_written else ""
            self._rle_file.write(sep + json.dumps(frame_record(fm)))
        if self._video is not None:
            self._video.add(overlay_frame(fm.frame, fm.masks))
        self.frames_written += 1
        self.seconds += time.perf_counter() - start

    def commit(self) -> None:
        """Move every staged output into place (same filesystem: atomic renames), once
        every frame is written."""
        self._join()
        self._raise_failure()
        if self._rle_file is not None:
            self._rle_file.write("\n]}\n")
            self._rle_file.close()
            self._rle_file = None
            public_mode(self._rle_tmp)
            os.replace(self._rle_tmp, self.rle_path)
        if self._video is not None:
            self._video.close()
            self._video = None
            public_mode(self._video_tmp)
            os.replace(self._video_tmp, self.overlay_path)
        if self._stage is not None:
            if self.overwrite:
                for old in self.folder.iterdir():
                    if old != self._stage and _is_mask_entry(old):
                        shutil.rmtree(old) if old.is_dir() else old.unlink()
            for entry in sorted(self._stage.iterdir()):
                os.replace(entry, self.folder / entry.name)
            self._stage.rmdir()
            self._stage = None

    def abort(self) -> None:
        """Remove everything staged; folders this writer created go too."""
        self._discard = True  # the writer thread drops what is still queued
        self._join()
        if self._rle_file is not None:
            self._rle_file.close()
            Path(self._rle_tmp).unlink(missing_ok=True)
        if self._video is not None:
            self._video.abort()
            Path(self._video_tmp).unlink(missing_ok=True)
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
        for folder in reversed(self._created):
            shutil.rmtree(folder, ignore_errors=True)
        self._rle_file = self._video = self._stage = None

    def __enter__(self) -> MaskWriter:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise


def overlay_frame(frame: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The frame with each expression's mask tinted in its own colour (in float on the
    masked pixels only: a whole float frame per frame is 5 MiB to fault in at 768x576)."""
    out = frame.copy()
    inside = masks.any(axis=0)
    tinted = out[inside].astype(np.float32)  # (N, 3)
    for i, mask in enumerate(masks):
        color = np.asarray(COLORS[i % len(COLORS)], np.float32)
        rows = mask[inside]
        tinted[rows] = (1 - alpha) * tinted[rows] + alpha * color
    out[inside] = tinted.round().astype(np.uint8)
    return out
