"""Uploaded videos on disk, content-addressed: `ROOT/<id>/` holds the video (a file, or the
frames of an archive) and `meta.json` with what its validation found. The id is the first
16 hex digits of the SHA-256 of the uploaded bytes (or of the file under the media root),
so the same video uploaded twice is stored once, and everything survives a restart.

A video is validated whole when it arrives (every frame decoded), so that a corrupt or
cut-short file is refused at upload, naming the frame, and never half-way through a
segmentation. What can be checked before decoding is checked first, against `Limits`: the
frame count and size the container or the first frame declares, and an archive's member
count and uncompressed size as it is listed (a 2 MB zip of one 2 GB member once took the
serving process's peak RSS to 5.1 GB: members were read whole into memory). Error messages name
the uploaded file and its members, never the server's own paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from export.manifest import sha256_file
from runtime.video import open_video
from virst.errors import VideoError
from virst.media import IMAGE_SUFFIXES

STALE_UPLOAD_S = 24 * 3600


class NotAVideo(VideoError):
    """Neither a video container nor an archive of frames."""


class TooLarge(VideoError):
    """More frames, larger frames or a larger archive than the server takes."""


@dataclass(frozen=True)
class Limits:
    """What one video may hold; checked before its frames are decoded or extracted."""

    frames: int = 100_000  # about an hour at 30 FPS
    megapixels: float = 36.0  # a frame; 8K (8192 x 4320) fits
    extracted_mb: float = 2048  # an archive's files, uncompressed

    @property
    def frame_bytes(self) -> int:
        """The largest image file a frame can need: 8 bytes a pixel (16-bit RGBA), raw."""
        return int(self.megapixels * 1e6 * 8) + (1 << 20)

    def check(self, frames: int, width: int, height: int) -> None:
        if frames > self.frames:
            raise TooLarge(f"{frames} frames; this server takes at most {self.frames}")
        if width * height > self.megapixels * 1e6:
            raise TooLarge(f"frames of {width}x{height}; this server takes at most "
                           f"{self.megapixels:g} megapixels a frame")


def content_id(path: Path) -> str:
    """A video file's id in the store: the first 16 hex digits of its bytes' SHA-256."""
    return sha256_file(path)[:16]


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


def validate(source: Path, limits: Limits) -> tuple[int, int, int]:
    """(frames, width, height) of a video within `limits` every frame of which decodes."""
    try:
        video = open_video(source)  # a probe: nothing decoded yet
    except VideoError as err:
        if "cannot read video" in str(err) or "no video stream" in str(err):
            raise NotAVideo(f"not a video: {err}") from err
        raise
    limits.check(video.length, video.width, video.height)
    if source.is_dir():
        for _ in video.frames():  # reads every frame; a corrupt one raises, naming it
            pass
    else:
        video.read([])  # decodes every frame; a corrupt or missing one raises, naming it
    return video.length, video.width, video.height


@contextlib.contextmanager
def _members(archive: Path) -> Iterator[Iterator]:
    """(name, declared size, open: None unless a file) of each entry of a zip or tar
    archive, as it is listed: a zip from its directory, a tar header by header (a
    compressed tar is not read past the entry being listed). A file reads at most its
    declared size in both."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            yield ((i.filename, i.file_size, None if i.is_dir() else lambda i=i: z.open(i))
                   for i in z.infolist())
    else:
        with tarfile.open(archive) as t:
            yield ((m.name, m.size, (lambda m=m: t.extractfile(m)) if m.isfile() else None)
                   for m in t)


def _extract(archive: Path, folder: Path, limits: Limits) -> None:
    """Image members of a zip or tar archive, flattened into `folder` (no paths kept, so
    no member can land outside it), streamed to disk. Refused before a member is read:
    more entries than `limits.frames`, more than `limits.extracted_mb` uncompressed, an image
    larger than a frame can be, two frames of one name (one would replace the other)."""
    folder.mkdir(parents=True)
    budget, files, names = limits.extracted_mb * (1 << 20), 0, set()
    try:
        with _members(archive) as members:
            for path, size, open_member in members:
                name, files, budget = Path(path).name, files + 1, budget - size
                image = open_member is not None and Path(name).suffix.lower() in IMAGE_SUFFIXES
                if files > limits.frames:  # every entry costs listing, frames or not
                    raise TooLarge(f"the archive holds more than {limits.frames} entries; "
                                   f"this server takes at most {limits.frames} frames")
                if image and size > limits.frame_bytes:
                    raise TooLarge(f"{path} is {size >> 20} MB uncompressed, more than a "
                                   f"frame of {limits.megapixels:g} megapixels can be")
                if budget < 0:
                    raise TooLarge(f"the archive's files exceed {limits.extracted_mb:g} MB "
                                   f"uncompressed (at {path})")
                if not image:
                    continue
                if name in names:
                    raise VideoError(f"the archive holds two frames named {name}")
                names.add(name)
                with open_member() as src, open(folder / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError) as err:
        raise VideoError(f"the archive is corrupt: {err}") from err
    if not names:
        raise NotAVideo("the archive holds no image frames")


def is_archive(path: Path) -> bool:
    return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)


class VideoStore:
    def __init__(self, root: str | Path, limits: Limits = Limits()):
        self.root, self.limits = Path(root), limits
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / ".incoming"
        self.tmp.mkdir(exist_ok=True)
        self._sweep()

    def _sweep(self) -> None:
        """Delete what uploads cut off by a crash left in `.incoming` (a day old: a live
        upload of another server on this store is never that old)."""
        for left in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if time.time() - left.stat().st_mtime <= STALE_UPLOAD_S:
                    continue
                if left.is_dir():
                    shutil.rmtree(left)
                else:
                    left.unlink()

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
            video_id = content_id(spooled)
            known = self.get(video_id)
            if known is not None:
                return known
            work = Path(tempfile.mkdtemp(dir=self.tmp))
            archive, label = is_archive(spooled), Path(name).name
            source = work / ("frames" if archive else
                             "video" + (Path(name).suffix.lower() or ".bin"))
            try:
                if archive:
                    _extract(spooled, source, self.limits)
                else:
                    os.replace(spooled, source)
                frames, width, height = validate(source, self.limits)
                final = self.root / video_id
                record = VideoRecord(video_id, frames, width, height, label,
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
            except VideoError as err:  # named as the client knows it, not by our paths
                text = str(err).replace(f"{source}/", f"{label}:").replace(str(source), label)
                raise type(err)(text) from err
            finally:
                shutil.rmtree(work, ignore_errors=True)
        finally:
            spooled.unlink(missing_ok=True)

    def add_path(self, path: Path) -> VideoRecord:
        """A video already on the server (under the media root): validated, not copied."""
        video_id = content_id(path) if path.is_file() else hashlib.sha256(
            str(path).encode()).hexdigest()[:16]
        known = self.get(video_id)
        if known is not None:
            return known
        frames, width, height = validate(path, self.limits)
        record = VideoRecord(video_id, frames, width, height, path.name, str(path))
        folder = self.root / video_id
        folder.mkdir(exist_ok=True)
        (folder / "meta.json").write_text(json.dumps(asdict(record)))
        return record

    def delete(self, video_id: str) -> bool:
        if self.get(video_id) is None:
            return False
        shutil.rmtree(self.root / video_id, ignore_errors=True)
        return True

    def touch(self, video_id: str) -> None:
        """Mark a video used now (eviction takes the least recently used first): its
        meta.json's mtime, set from the nanosecond clock (the filesystem's own time is
        coarse: two uses a millisecond apart got one mtime)."""
        now = time.time_ns()
        with contextlib.suppress(OSError):
            os.utime(self.root / video_id / "meta.json", ns=(now, now))

    def evict(self, max_bytes: int, keep: set[str]) -> list[str]:
        """Delete the least recently used videos, never those in `keep` (in use), until
        the store holds at most `max_bytes`; the ids deleted."""
        videos = []
        for folder in self.root.iterdir():
            meta = folder / "meta.json"
            if not folder.name.startswith(".") and meta.is_file():
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                videos.append((meta.stat().st_mtime_ns, folder.name, size))
        total, evicted = sum(size for _, _, size in videos), []
        for _, video_id, size in sorted(videos):
            if total <= max_bytes:
                break
            if video_id not in keep and self.delete(video_id):
                total -= size
                evicted.append(video_id)
        return evicted
