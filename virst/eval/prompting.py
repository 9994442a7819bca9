"""Does the model follow its prompt? Measurements that catch a model that ignores what it
is told while it trains, not afterwards, and say where a low score comes from.

- `click_following`: on held-out shapes frames, one click in the middle of each visible
  object through SAM2's prompt encoder: the mean IoU of the mask with that object, and the
  agreement (mean IoU) between the masks of clicks on different objects of one frame. A
  decoder that ignores its prompt gives the same mask for every click: agreement near 1.
- `track_following`: on held-out shapes clips, one click on each object in the first frame,
  SAM2's memory propagation over the next frames: the mean IoU of the tracked masks with
  that object, and the agreement between the tracked masks of different objects. A tracker
  that ignores its memory gives every object the same tracked masks: agreement near 1.
- `expression_agreement`: the same agreement for the masks of different expressions (with
  different target objects) of one clip, from a model's saved predictions.
- `anchor_ceiling`: J&F on shapes videos with the model's own prompts on its anchor frames
  and with a ground-truth click there instead, tracking unchanged: what a perfect prompt
  would reach, i.e. how much of the gap is the prompt and how much the tracking.

`python -m virst.eval.prompting [--model DIR] [--videos N]` prints the first two and the
last on the shapes valid split.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from virst.preprocess import to_model_input
from virst.tdau import TorchSam2Steps, anchor_heads, click_tokens, encode_batch, propagate

MIN_AREA = 20  # pixels at model resolution: smaller (mostly hidden) objects get no click


def interior_click(mask: np.ndarray) -> list[float]:
    """The pixel deepest inside `mask` (x, y): a click no boundary ambiguity can move."""
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return [float(x), float(y)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _at_model_size(masks: np.ndarray, size: int) -> np.ndarray:
    """(N, C, H, W) bool masks -> (N, C, size, size) bool (nearest, as training's targets)."""
    resized = F.interpolate(torch.from_numpy(masks).float(), size=(size, size),
                            mode="nearest-exact")
    return (resized > 0.5).numpy()


def _object_masks(split: str, index: int, size: int, per_video: int = 0, first: int = 0):
    """Frames (k, H, W, 3) and their object masks (k, O, size, size) of one shapes video:
    `per_video` frames spread over it, or its `first` frames."""
    from virst.data.shapes import make_video

    video = make_video(split, index)
    idx = (np.arange(min(first, len(video.frames))) if first else
           np.linspace(0, len(video.frames) - 1, per_video).round().astype(int))
    return video.frames[idx], _at_model_size(video.masks[:, idx], size).transpose(1, 0, 2, 3)


def shapes_views(videos: int, per_video: int = 2, size: int = 256, split: str = "valid"):
    """(frames, object masks) of `per_video` frames of the first `videos` shapes videos."""
    return [_object_masks(split, i, size, per_video=per_video) for i in range(videos)]


def shapes_clips(videos: int, frames: int = 8, size: int = 256, split: str = "valid"):
    """(frames, object masks) of the first `frames` frames of the first `videos` videos."""
    return [_object_masks(split, i, size, first=frames) for i in range(videos)]


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


def _track(model, steps, feats: list, click: list[float]) -> np.ndarray:
    """Masks (k, S, S) of a click on frame 0 propagated by SAM2's memory over the k frames
    whose features are `feats`."""
    size = model.config.sam_image_size
    prompt = {0: click_tokens(model.sam2, [[click]], [[1]])}
    out = [F.interpolate(r.low_res, size=(size, size), mode="bilinear",
                         align_corners=False)[0, 0] > 0
           for _, r in propagate(steps, feats.__getitem__, prompt, len(feats))]
    return torch.stack(out).cpu().numpy()


@torch.no_grad()
def track_following(model, clips, max_objects: int = 3) -> dict:
    """Tracked-frame IoU and agreement over `clips`: (frames (k, H, W, 3) uint8, object
    masks (k, O, S, S) bool) of consecutive frames, e.g. `shapes_clips(...)`. Frames 1..k-1
    are scored; objects are those visible in frame 0 (up to `max_objects`)."""
    was_training = model.training
    model.eval()
    steps = TorchSam2Steps(model.sam2, bf16_storage=False)
    ious, agree = [], []
    cfg = model.config
    for frames, masks in clips:
        visible = [o for o in range(masks.shape[1]) if masks[0, o].sum() >= MIN_AREA]
        feats = steps.encode(to_model_input(frames, cfg.sam_image_size, cfg.sam_resize,
                                            model.device))
        tracks = [_track(model, steps, feats, interior_click(masks[0, o]))
                  for o in visible[:max_objects]]
        for o, pred in zip(visible, tracks):
            ious += [iou(pred[t], masks[t, o]) for t in range(1, len(frames))]
        for a, b in combinations(range(len(tracks)), 2):
            agree += [iou(tracks[a][t], tracks[b][t]) for t in range(1, len(frames))]
    model.train(was_training)
    return {"track_iou": float(np.mean(ious)) if ious else float("nan"),
            "track_agreement": float(np.mean(agree)) if agree else float("nan"),
            "tracked_frames": len(ious)}


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


def _click_prompts(model, stf: dict, target: np.ndarray) -> dict:
    """A ground-truth click on every anchor frame that shows the target (the model's own
    prompt where it does not): (T, H, W) bool target."""
    masks = _at_model_size(target[list(stf)][None], model.config.sam_image_size)[0]
    return {frame: (click_tokens(model.sam2, [[interior_click(mask)]], [[1]])
                    if mask.sum() >= MIN_AREA else prompt)
            for (frame, prompt), mask in zip(stf.items(), masks)}


@torch.no_grad()
def anchor_ceiling(model, videos: int, split: str = "valid") -> dict:
    """Mean J, F and J&F (x100) over every expression of the first `videos` shapes videos,
    with the model's prompts ("model") and with ground-truth clicks ("clicks") on the
    anchor frames of its deterministic plan; the same SAM2 propagation for both."""
    from virst.data.shapes import make_video
    from virst.eval.metrics import sequence_jf
    from virst.media import load_video
    from virst.model import FrameEncoder, propagate_masks
    from virst.prompt import build_prompt
    from virst.sampling import plan_frames

    cfg = model.config
    was_training = model.training
    model.eval()
    scores: dict[str, list] = {"model": [], "clicks": []}
    for index in range(videos):
        shapes = make_video(split, index)
        video = load_video(shapes.frames)
        plan = plan_frames(len(video), cfg)
        steps = TorchSam2Steps(model.sam2, cfg.memory_bf16_storage)
        frames = FrameEncoder(steps, video.frames, cfg, model.device, keep=range(len(video)))
        for text, objects, _ in shapes.expressions:
            target = shapes.masks[objects].any(0)
            own = model.frame_prompts(video, plan, build_prompt(
                model.tokenizer, text, cfg.num_seg_tokens), frames)
            for name, prompts in (("model", own), ("clicks", _click_prompts(model, own, target))):
                scores[name].append(sequence_jf(target, propagate_masks(steps, frames, prompts,
                                                                        video)))
    model.train(was_training)
    return {name: dict(zip(("J", "F", "J&F"), (100 * np.mean(rows, axis=0)).round(2).tolist()))
            for name, rows in scores.items()}


def main(argv: list[str] | None = None) -> None:
    import argparse

    from virst.cli import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder (default: the embedded model)")
    parser.add_argument("--videos", type=int, default=12, help="shapes valid videos")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small models: one thread is fastest on shared cores
    model = load_model(args.model)
    print("clicks (2 frames per video):", click_following(model, shapes_views(args.videos)))
    print("tracking (8-frame clips):   ", track_following(model, shapes_clips(args.videos)))
    labels = {"model": "the model's prompts", "clicks": "ground-truth clicks"}
    for name, row in anchor_ceiling(model, args.videos).items():
        print(f"anchors given {labels[name]}: {row}")


if __name__ == "__main__":
    main()
