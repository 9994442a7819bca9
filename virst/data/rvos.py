"""Readers of the published RVOS dataset layouts, all yielding the same `Expression` records.

    mevis     ROOT/meta_expressions.json, ROOT/mask_dict.json (COCO RLE per anno id),
              ROOT/JPEGImages/<video>/<frame>.jpg
    revos     ROOT/meta_expressions_<split>_.json (with type_id), ROOT/mask_dict.json,
              ROOT/mask_dict_foreground.json, ROOT/JPEGImages/<video>/<frame>.jpg
    refytvos  ROOT/meta_expressions/<split>/meta_expressions.json, ROOT/<split>/mask_dict.pkl,
    davis17   ROOT/<split>/JPEGImages/<video>/<frame>.jpg; anno ids are numbered in order
              of sorted videos, then expressions (sorted for DAVIS, file order for YouTube)
    shapes    our generated benchmark, in the revos layout

A ground-truth mask of an expression is the union of its objects' masks.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as cocomask

from virst.errors import InputError
from virst.media import Video

DATASETS = ("revos", "mevis", "refytvos", "davis17", "shapes")
TYPE_NAMES = {0: "referring", 1: "reasoning", 2: "no-target"}


@dataclass(frozen=True)
class Expression:
    video: str
    exp_id: str
    text: str
    frames: tuple[str, ...]  # frame names, in order
    anno_ids: tuple[str, ...]
    type_id: int | None = None  # ReVOS: 0 referring, 1 reasoning, 2 no target

    @property
    def key(self) -> str:
        return f"{self.video}/{self.exp_id}"


def _load_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise InputError(f"dataset file missing: {path}") from err
    except json.JSONDecodeError as err:
        raise InputError(f"dataset file {path} is not valid JSON: {err}") from err


def _load_pickle(path: Path):
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except FileNotFoundError as err:
        raise InputError(f"dataset file missing: {path}") from err


def decode_rle(rle, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool from a COCO RLE dict (counts as str or bytes); None is an empty mask."""
    if not rle:
        return np.zeros(shape, bool)
    if isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode()}
    m = cocomask.decode(rle)
    return (m.sum(axis=2) if m.ndim == 3 else m) > 0


def encode_rle(mask: np.ndarray) -> dict | None:
    """COCO RLE with str counts (JSON-friendly); None for an empty mask, as the datasets do."""
    if not mask.any():
        return None
    rle = cocomask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}


class RVOSDataset:
    """Expressions of one split plus access to frames, ground truth and (ReVOS) foreground."""

    def __init__(self, name: str, root: Path, frame_dir: Path, expressions: list[Expression],
                 masks: dict, foreground: dict | None = None):
        self.name, self.root, self.frame_dir = name, root, frame_dir
        self.expressions, self.masks, self.foreground_masks = expressions, masks, foreground

    def __len__(self) -> int:
        return len(self.expressions)

    def frame_paths(self, expr: Expression) -> list[Path]:
        folder = self.frame_dir / expr.video
        paths = []
        for name in expr.frames:
            hits = [folder / f"{name}{ext}" for ext in (".jpg", ".png", ".jpeg")]
            found = next((p for p in hits if p.is_file()), None)
            if found is None:
                raise InputError(f"frame {name} of video {expr.video} not found in {folder}")
            paths.append(found)
        return paths

    def load_video(self, expr: Expression) -> Video:
        frames = []
        for path in self.frame_paths(expr):
            with Image.open(path) as im:
                frames.append(np.asarray(im.convert("RGB")))
        if not frames:
            raise InputError(f"{self.name}: video {expr.video} lists no frames")
        return Video(np.stack(frames), list(expr.frames))

    def frame_size(self, expr: Expression) -> tuple[int, int]:
        with Image.open(self.frame_paths(expr)[0]) as im:
            return im.height, im.width

    def ground_truth(self, expr: Expression) -> np.ndarray:
        """(T, H, W) bool: the union of the expression's objects, frame by frame."""
        shape = self.frame_size(expr)
        gt = np.zeros((len(expr.frames), *shape), bool)
        for anno in expr.anno_ids:
            if anno not in self.masks:
                raise InputError(f"{self.name}: anno id {anno} of {expr.key} has no masks")
            rles = self.masks[anno]
            if len(rles) != len(expr.frames):
                raise InputError(f"{self.name}: anno id {anno} has {len(rles)} masks for "
                                 f"{len(expr.frames)} frames of {expr.video}")
            for t, rle in enumerate(rles):
                gt[t] |= decode_rle(rle, shape)
        return gt

    def foreground(self, expr: Expression) -> np.ndarray | None:
        """ReVOS: all annotated objects of the video, (T, H, W) bool."""
        if self.foreground_masks is None:
            return None
        shape = self.frame_size(expr)
        rles = self.foreground_masks[expr.video]["masks_rle"]
        return np.stack([decode_rle(r, shape) for r in rles])


def _revos(root: Path, split: str, name: str) -> RVOSDataset:
    meta = _load_json(root / f"meta_expressions_{split}_.json")["videos"]
    exprs = [
        Expression(vid, eid, e["exp"], tuple(v["frames"]), tuple(str(a) for a in e["anno_id"]),
                   int(e.get("type_id", 0)))
        for vid, v in meta.items() for eid, e in v["expressions"].items()
    ]
    return RVOSDataset(name, root, root / "JPEGImages", exprs, _load_json(root / "mask_dict.json"),
                       _load_json(root / "mask_dict_foreground.json"))


def _mevis(root: Path, split: str) -> RVOSDataset:
    meta = _load_json(root / "meta_expressions.json")["videos"]
    exprs = [
        Expression(vid, eid, e["exp"], tuple(sorted(v["frames"])),
                   tuple(str(a) for a in e["anno_id"]))
        for vid, v in meta.items() for eid, e in v["expressions"].items()
    ]
    return RVOSDataset("mevis", root, root / "JPEGImages", exprs,
                       _load_json(root / "mask_dict.json"))


def _youtube_style(root: Path, split: str, name: str) -> RVOSDataset:
    meta = _load_json(root / "meta_expressions" / split / "meta_expressions.json")["videos"]
    videos = sorted(meta)
    test_file = root / "meta_expressions" / "test" / "meta_expressions.json"
    if name == "refytvos" and split == "valid" and test_file.is_file():
        test_videos = set(_load_json(test_file)["videos"])  # valid file also lists test videos
        videos = [v for v in videos if v not in test_videos]
    exprs, anno = [], 0
    for vid in videos:
        ids = list(meta[vid]["expressions"])
        for eid in sorted(ids) if name == "davis17" else ids:
            frames = meta[vid]["frames"]
            exprs.append(Expression(vid, eid, meta[vid]["expressions"][eid]["exp"],
                                    tuple(sorted(frames) if name == "davis17" else frames),
                                    (str(anno),)))
            anno += 1
    masks = _load_pickle(root / split / "mask_dict.pkl")
    return RVOSDataset(name, root, root / split / "JPEGImages", exprs, masks)


def open_dataset(name: str, root: str | Path, split: str = "valid") -> RVOSDataset:
    root = Path(root)
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not root.is_dir():
        raise InputError(f"dataset root {root} does not exist")
    if name in ("revos", "shapes"):
        return _revos(root, split, name)
    if name == "mevis":
        return _mevis(root, split)
    return _youtube_style(root, split, name)
