"""A client of `virst serve` (httpx): upload a video once, segment it, write the same mask
folder (or RLE file) `virst segment` writes.

    from runtime.client import Client
    client = Client("http://127.0.0.1:8000", api_key="...")
    video = client.upload("clip.mp4")                     # {"id", "frames", ...}
    for record in client.segment(video["id"], ["the red circle"]):
        ...                                               # one dict per frame, then a summary
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from pycocotools import mask as coco_mask

from runtime.writer import FrameMasks, MaskWriter
from virst.errors import VirstError


class ServerError(VirstError):
    """The server answered with an error status; the message is its own."""


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

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
        path = Path(path)
        with open(path, "rb") as f:
            return self._check(self.http.post("/v1/videos", files={"file": (path.name, f)})).json()

    def segment(self, video_id: str, expressions: list[str]) -> Iterator[dict]:
        """Frame records as the server streams them, then {"summary": ...}."""
        with self.http.stream("POST", f"/v1/videos/{video_id}/segment",
                              json={"expressions": expressions}) as response:
            self._check(response)
            for line in response.iter_lines():
                if not line.strip():
                    continue
                record = json.loads(line)
                if "error" in record:
                    raise ServerError(f"server stopped: {record['error']}")
                yield record

    def close(self) -> None:
        self.http.close()


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
