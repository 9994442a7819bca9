"""A client of `virst serve` (httpx): upload a video once, segment it, write the same mask
folder (or RLE file) `virst segment` writes.

    from runtime.client import Client
    client = Client("http://127.0.0.1:8000", api_key="...")
    video = client.upload("clip.mp4")                     # {"id", "frames", ...}
    for record in client.segment(video["id"], ["the red circle"]):
        ...                                               # one dict per frame, then a summary
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from pycocotools import mask as coco_mask

from runtime.store import content_id
from runtime.writer import FrameMasks, MaskWriter
from virst.errors import InputError, VirstError
from virst.media import IMAGE_SUFFIXES

BUSY_RETRIES = 5  # answers 429 (the server is busy) waited out, each for its Retry-After


class ServerError(VirstError):
    """The server answered with an error status (the message is its own), or could not be
    reached."""


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    @contextlib.contextmanager
    def _request(self, method: str, path: str, body=None, allow=(), **kwargs):
        """The response (streamed), an error status raised unless in `allow`; a 429 is
        waited out up to BUSY_RETRIES times; `body()` gives each try's keyword arguments
        afresh; a server that cannot be reached, or is lost half-way, is a ServerError."""
        for attempt in range(BUSY_RETRIES + 1):
            try:
                with self.http.stream(method, path, **kwargs, **(body() if body else {})) as r:
                    if r.status_code == 429 and attempt < BUSY_RETRIES:
                        time.sleep(_seconds(r.headers.get("retry-after")))
                        continue
                    yield r if r.status_code in allow else self._check(r)
                    return
            except httpx.TransportError as err:
                raise ServerError(f"cannot reach the server at {self.url}: {err}") from err

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            response.read()
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise ServerError(f"server answered {response.status_code}: {message}")
        return response

    def upload(self, path: str | Path) -> dict:
        """A video file, or a folder of frames (sent as a zip); not sent again when the
        server holds it already (its id is the SHA-256 of the bytes it was sent)."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"no such video or frame folder: {path}")
        with _as_file(path) as (file, name):
            with self._request("GET", f"/v1/videos/{content_id(file)}",
                               allow=(404,)) as known:
                if known.status_code == 200:
                    return json.loads(known.read())
            with open(file, "rb") as f:
                def body():
                    f.seek(0)
                    return {"files": {"file": (name, f)}}

                with self._request("POST", "/v1/videos", body) as response:
                    return json.loads(response.read())

    def segment(self, video_id: str, expressions: list[str]) -> Iterator[dict]:
        """Frame records as the server streams them, then {"summary": ...}."""
        with self._request("POST", f"/v1/videos/{video_id}/segment",
                           json={"expressions": expressions}) as response:
            for line in response.iter_lines():
                if not line.strip():
                    continue
                record = json.loads(line)
                if "error" in record:
                    raise ServerError(f"server stopped: {record['error']}")
                yield record

    def close(self) -> None:
        self.http.close()


def _seconds(retry_after: str | None) -> float:
    """A Retry-After in seconds (1 when absent or given as a date)."""
    try:
        return max(0.0, float(retry_after))
    except (TypeError, ValueError):
        return 1.0


@contextlib.contextmanager
def _as_file(path: Path):
    """(file, name) to upload: a video file as it is; a frame folder's images as a zip
    (stored: frames are compressed already; fixed dates: the same frames, the same id)."""
    if not path.is_dir():
        yield path, path.name
        return
    frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        raise InputError(f"no frames in folder {path} (looked for {sorted(IMAGE_SUFFIXES)})")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / f"{path.name}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
            for frame in frames:
                z.writestr(zipfile.ZipInfo(frame.name), frame.read_bytes())
        yield archive, archive.name


def decode_record(record: dict) -> FrameMasks:
    masks = np.stack([coco_mask.decode({"size": m["rle"]["size"],
                                        "counts": m["rle"]["counts"].encode()}).astype(bool)
                      for m in record["masks"]])
    scores = np.array([m["score"] for m in record["masks"]], np.float32)
    return FrameMasks(record["frame"], record["name"], masks, scores)


def segment_to(url: str, video: str | Path, expressions: list[str], *, folder=None,
               rle_path=None, overwrite: bool = False, api_key: str | None = None) -> dict:
    """Upload, segment, write masks as `virst segment` does; returns the server's summary."""
    writer = MaskWriter(expressions, (0, 0), folder=folder, rle_path=rle_path,
                        overwrite=overwrite, label=str(video))  # outputs checked first
    client = Client(url, api_key)
    try:
        info = client.upload(video)
        writer.size = (info["height"], info["width"])
        summary = {}
        with writer:
            for record in client.segment(info["id"], expressions):
                if "summary" in record:
                    summary = record["summary"]
                else:
                    writer.write(decode_record(record))
        return summary
    finally:
        client.close()
