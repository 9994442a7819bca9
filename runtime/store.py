"""Uploaded videos on disk, content-addressed: `ROOT/<id>/` holds the video (a file, or the
frames of an archive) and `meta.json` with what its validation found. The id is the first
16 hex digits of the SHA-256 of the uploaded bytes (or of the file under the media root),
so the same video uploaded twice is stored once, and everything survives a restart.

A video is validated whole when it arrives (every frame decoded), so that a corrupt or
cut-short file is refused at upload, naming the frame, and never half-way through a
segmentation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from export.manifest import sha256_file
from runtime.video import open_video
from virst.errors import VideoError
from virst.media import IMAGE_SUFFIXES


class NotAVideo(VideoError):
    """Neither a video container nor an archive of frames."""


@dataclass
class VideoRecord:
    id: str
    frames: int
    width: int
    height: int
    name: str
    source: str  # the file or frame folder the runtime reads

    def public(self) -> dict:
        return {"id": self.id, "frames": self.frames, "width": self.width,
                "height": self.height, "name": self.name}


def validate(source: Path) -> tuple[int, int, int]:
    """(frames, width, height) of a video every frame of which decodes."""
    try:
        video = open_video(source)
    except VideoError as err:
        if "cannot read video" in str(err) or "no video stream" in str(err):
            raise NotAVideo(f"not a video: {err}") from err
        raise
    if source.is_dir():
        for _ in video.frames():  # reads every frame; a corrupt one raises, naming it
            pass
    else:
        video.read([])  # decodes every frame; a corrupt or missing one raises, naming it
    return video.length, video.width, video.height


def _extract(archive: Path, folder: Path) -> None:
    """Image members of a zip or tar archive, flattened into `folder` (no paths kept, so
    no member can land outside it)."""
    folder.mkdir(parents=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                name = Path(info.filename).name
                if not info.is_dir() and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    (folder / name).write_bytes(z.read(info))
    else:
        with tarfile.open(archive) as t:
            for member in t.getmembers():
                name = Path(member.name).name
                if member.isfile() and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    (folder / name).write_bytes(t.extractfile(member).read())
    if not any(folder.iterdir()):
        raise NotAVideo("the archive holds no image frames")


def is_archive(path: Path) -> bool:
    return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)


class VideoStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / ".incoming"
        self.tmp.mkdir(exist_ok=True)

    def spool(self) -> Path:
        """A fresh temporary file for an upload in progress (same filesystem as the store)."""
        fd, name = tempfile.mkstemp(dir=self.tmp)
        os.close(fd)
        return Path(name)

    def get(self, video_id: str) -> VideoRecord | None:
        if not video_id.isalnum():
            return None
        meta = self.root / video_id / "meta.json"
        if not meta.is_file():
            return None
        return VideoRecord(**json.loads(meta.read_text()))

    def add_upload(self, spooled: Path, name: str) -> VideoRecord:
        """Validate an uploaded file (video or frame archive) and keep it; the spool file
        is consumed either way."""
        try:
            video_id = sha256_file(spooled)[:16]
            known = self.get(video_id)
            if known is not None:
                return known
            work = Path(tempfile.mkdtemp(dir=self.tmp))
            try:
                if is_archive(spooled):
                    source = work / "frames"
                    _extract(spooled, source)
                else:
                    source = work / ("video" + (Path(name).suffix.lower() or ".bin"))
                    os.replace(spooled, source)
                frames, width, height = validate(source)
                final = self.root / video_id
                record = VideoRecord(video_id, frames, width, height, Path(name).name,
                                     str(final / source.name))
                (work / "meta.json").write_text(json.dumps(asdict(record)))
                try:
                    os.replace(work, final)
                except OSError:  # the same video, uploaded at the same time, got there first
                    existing = self.get(video_id)
                    if existing is None:
                        raise
                    return existing
                return record
            finally:
                shutil.rmtree(work, ignore_errors=True)
        finally:
            spooled.unlink(missing_ok=True)

    def add_path(self, path: Path) -> VideoRecord:
        """A video already on the server (under the media root): validated, not copied."""
        video_id = sha256_file(path)[:16] if path.is_file() else hashlib.sha256(
            str(path).encode()).hexdigest()[:16]
        known = self.get(video_id)
        if known is not None:
            return known
        frames, width, height = validate(path)
        record = VideoRecord(video_id, frames, width, height, path.name, str(path))
        folder = self.root / video_id
        folder.mkdir(exist_ok=True)
        (folder / "meta.json").write_text(json.dumps(asdict(record)))
        return record

    def delete(self, video_id: str) -> bool:
        if self.get(video_id) is None:
            return False
        shutil.rmtree(self.root / video_id)
        return True
