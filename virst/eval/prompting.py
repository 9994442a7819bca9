"""Does the model follow its prompt? Two measurements, so that a model that ignores what it
is told is caught while it trains, not discovered afterwards.

- `click_following`: on held-out shapes frames, one click in the middle of each visible
  object through SAM2's prompt encoder: the mean IoU of the mask with that object, and the
  agreement (mean IoU) between the masks of clicks on different objects of one frame. A
  decoder that ignores its prompt gives the same mask for every click: agreement near 1.
- `expression_agreement`: the same agreement for the masks of different expressions (with
  different target objects) of one clip, from a model's saved predictions.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from virst.preprocess import to_model_input
from virst.tdau import anchor_heads, click_tokens, encode_batch

MIN_AREA = 20  # pixels at model resolution: smaller (mostly hidden) objects get no click


def interior_click(mask: np.ndarray) -> list[float]:
    """The pixel deepest inside `mask` (x, y): a click no boundary ambiguity can move."""
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return [float(x), float(y)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _object_masks(split: str, index: int, per_video: int, size: int):
    """Frames (k, H, W, 3) and their object masks (k, O, size, size) of one shapes video."""
    from virst.data.shapes import make_video

    video = make_video(split, index)
    idx = np.linspace(0, len(video.frames) - 1, per_video).round().astype(int)
    masks = torch.from_numpy(video.masks[:, idx]).float()
    masks = F.interpolate(masks, size=(size, size), mode="nearest-exact") > 0.5
    return video.frames[idx], masks.permute(1, 0, 2, 3).numpy()


def shapes_views(videos: int, per_video: int = 2, size: int = 256, split: str = "valid"):
    """(frames, object masks) of `per_video` frames of the first `videos` shapes videos."""
    return [_object_masks(split, i, per_video, size) for i in range(videos)]


@torch.no_grad()
def click_following(model, views) -> dict:
    """Click IoU and click agreement over `views`: (frames (k, H, W, 3) uint8, object masks
    (k, O, S, S) bool at model resolution S) pairs, e.g. `shapes_views(...)`."""
    cfg, sam = model.config, model.sam2
    size = cfg.sam_image_size
    was_training = model.training
    model.eval()
    ious, agree = [], []
    for frames, masks in views:
        feats = encode_batch(sam, to_model_input(frames, size, cfg.sam_resize, model.device))
        for k in range(len(frames)):
            visible = [o for o in range(masks.shape[1]) if masks[k, o].sum() >= MIN_AREA]
            if not visible:
                continue
            points = [[interior_click(masks[k, o])] for o in visible]
            sparse = click_tokens(sam, points, [[1]] * len(visible))
            head = anchor_heads(sam, feats.take([k] * len(visible)), sparse)
            pred = F.interpolate(head.low_res, size=(size, size), mode="bilinear",
                                 align_corners=False)[:, 0].cpu().numpy() > 0
            ious += [iou(p, masks[k, o]) for p, o in zip(pred, visible)]
            agree += [iou(pred[a], pred[b]) for a, b in combinations(range(len(visible)), 2)]
    model.train(was_training)
    return {"click_iou": float(np.mean(ious)) if ious else float("nan"),
            "click_agreement": float(np.mean(agree)) if agree else float("nan"),
            "clicks": len(ious), "pairs": len(agree)}


def expression_agreement(dataset, pred_dir: str | Path) -> dict:
    """Mean IoU (over all frames of the clip) between the predicted masks of two
    expressions of one clip that name different objects; near 1: the sentence is ignored."""
    from virst.eval.scoring import read_prediction

    by_video: dict[str, list] = {}
    for expr in dataset.expressions:
        by_video.setdefault(expr.video, []).append(expr)
    values = []
    for exprs in by_video.values():
        if len(exprs) < 2:
            continue
        shape = dataset.frame_size(exprs[0])
        preds = {e.key: read_prediction(Path(pred_dir) / e.video / e.exp_id, e.frames,
                                        shape)[0] for e in exprs}
        for a, b in combinations(exprs, 2):
            if set(a.anno_ids) != set(b.anno_ids):
                values.append(iou(preds[a.key], preds[b.key]))
    return {"agreement": float(np.mean(values)) if values else float("nan"),
            "pairs": len(values)}
