"""One training step's forward pass: a video, its expressions, the stage's losses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from virst.model import VirstModel
from virst.preprocess import to_model_input
from virst.prompt import SEG_TOKEN, Prompt, build_prompt, normalize_expression
from virst.sampling import plan_frames
from virst.tdau import (
    HeadOutput,
    TorchSam2Steps,
    anchor_heads,
    click_tokens,
    encode_batch,
    propagate,
)
from virst.train.losses import IGNORE, expression_words, frame_losses, grounding


@dataclass
class GroundFeatures:
    """What "ground" mode reads of a video. Its encoders are frozen there, so the trainer
    computes this once per training video and keeps it (about 3 MB at `tiny`, against
    about 1 s of SAM2 image encoder per video on a CPU core)."""

    level2: torch.Tensor  # (1, T, C, h, w) SAM2 features of the segmentation frames
    video_tokens: torch.Tensor  # the video tower's tokens
    cells: list[torch.Tensor]  # per expression (T, g, g): the target's share of each cell


@dataclass
class Sample:
    """A training video with its expressions and their ground-truth masks."""

    frames: np.ndarray  # (L, H, W, 3) uint8
    texts: list[str]
    masks: list[np.ndarray]  # one (L, H, W) bool per expression
    seed: int  # frame sampling and anchor choice
    objects: np.ndarray | None = None  # (O, L, H, W) bool: every object (click training)
    features: GroundFeatures | None = None  # "ground" mode: the frozen encoders' outputs

    def click_targets(self) -> np.ndarray:
        """What clicks may land on: every object, else the expressions' targets."""
        return self.objects if self.objects is not None else np.stack(self.masks)


def shapes_sample(index: int) -> Sample:
    from virst.data.shapes import make_video

    v = make_video("train", index)
    return Sample(v.frames, [t for t, _, _ in v.expressions],
                  [v.masks[objs].any(axis=0) for _, objs, _ in v.expressions], index, v.masks)


def answer_targets(prompt: Prompt, video_tokens: int, seg_id: int):
    """Positions whose next token is part of the assistant's answer (not a [SEG]), and
    those tokens: the token-CE targets."""
    offset = len(prompt.before) + video_tokens
    pos, labels = [], []
    for i in range(prompt.answer_start, len(prompt.after)):
        if prompt.after[i] != seg_id:
            pos.append(offset + i - 1)
            labels.append(prompt.after[i])
    return pos, labels


def keyframes(num: int, anchors: list[int], after: int = 5, before: int = 2) -> list[int]:
    """The release's training frames around random anchors: up to 5 after, 2 before each."""
    chosen = set(anchors)
    for k in anchors:
        chosen.update(range(k + 1, min(num, k + after + 1)))
        chosen.update(range(max(0, k - before), k))
    return sorted(chosen)


def _accumulate(parts: dict, heads: list[HeadOutput], targets: torch.Tensor, size: int):
    for head, target in zip(heads, targets):
        fl = frame_losses(head.candidates[0], head.ious[0], head.obj_score[0], target, size)
        present = bool((target > 0.5).any())
        for k in ("bce", "dice", "iou"):
            if present:
                parts[k].append(getattr(fl, k))
        parts["occlusion"].append(fl.occlusion)


def _split(head: HeadOutput) -> list[HeadOutput]:
    """A batched head output as one per frame."""
    return [HeadOutput(*(x[b : b + 1] for x in (head.low_res, head.high_res, head.obj_ptr,
                                                 head.obj_score, head.ious, head.candidates)))
            for b in range(head.low_res.shape[0])]


def _pixel(region: torch.Tensor, rng: np.random.Generator) -> list[float]:
    ys, xs = torch.nonzero(region, as_tuple=True)
    k = int(rng.integers(len(ys)))
    return [float(xs[k]), float(ys[k])]


def corrective_clicks(pred: torch.Tensor, targets: torch.Tensor,
                      rng: np.random.Generator) -> tuple[list, list]:
    """SAM2's interactive training: the next click lands in the larger error region, positive
    on a missed pixel, negative on a false one (a perfect mask gets another positive)."""
    points, labels = [], []
    for p, t in zip(pred, targets > 0.5):
        missed, false = t & ~p, p & ~t
        region, label = (missed, 1) if missed.sum() >= false.sum() else (false, 0)
        if not region.any():
            region, label = t, 1
        points.append([_pixel(region, rng)])
        labels.append([label])
    return points, labels


MIN_PIXELS = 12  # an object this small (mostly hidden) in a frame gets no click there


def _visible_object(targets: np.ndarray, seg: list[int], rng, min_frames: int = 1):
    """A random object index visible (MIN_PIXELS or more) in `min_frames` of the `seg`
    frames."""
    counts = (targets[:, seg].sum(axis=(2, 3)) >= MIN_PIXELS).sum(axis=1)
    ok = np.flatnonzero(counts >= min_frames)
    return int(rng.choice(ok)) if len(ok) else None


def click_losses(model: VirstModel, feats, targets: torch.Tensor, rng, parts: dict,
                 corrections: int = 1) -> None:
    """Per frame a random click on the target, then `corrections` rounds of corrective
    clicks (the clicks so far plus one in the error region), every round supervised."""
    size = model.config.sam_image_size
    frames = [t for t in range(targets.shape[0]) if bool(targets[t].any())]
    if not frames:
        return
    sub, target = feats.take(frames), targets[frames]
    points = [[_pixel(t > 0.5, rng)] for t in target]
    labels = [[1] for _ in frames]
    for round_ in range(corrections + 1):
        head = anchor_heads(model.sam2, sub, click_tokens(model.sam2, points, labels))
        _accumulate(parts, _split(head), target, size)
        if round_ < corrections:
            pred = F.interpolate(head.low_res.detach(), size=(size, size), mode="bilinear",
                                 align_corners=False)[:, 0] > 0
            more, more_labels = corrective_clicks(pred, target, rng)
            points = [p + m for p, m in zip(points, more)]
            labels = [lab + m for lab, m in zip(labels, more_labels)]


def propagate_losses(model: VirstModel, feats, seg_targets: torch.Tensor, prompts, rng,
                     parts: dict) -> None:
    """3 random anchor frames (of the T segmentation frames) predicted from `prompts(a)`,
    SAM2 memory propagation over the frames around them, every frame supervised."""
    t = seg_targets.shape[0]
    anchors = sorted(rng.choice(t, size=min(3, t), replace=False).tolist())
    frames = keyframes(t, anchors)
    local = {frames.index(a): prompts(a) for a in anchors}
    steps = TorchSam2Steps(model.sam2, bf16_storage=False)
    outs = dict(propagate(steps, lambda i, f=frames: feats.select(f[i]), local, len(frames)))
    heads = [HeadOutput(o.low_res, None, o.obj_ptr, o.obj_score, o.ious, o.candidates)
             for _, o in sorted(outs.items())]
    _accumulate(parts, heads, seg_targets[frames], model.config.sam_image_size)


def _targets_at(masks: np.ndarray, seg: list[int], size: int, device) -> torch.Tensor:
    """(L, H, W) bool masks -> (T, size, size) float targets on the segmentation frames."""
    target = torch.from_numpy(masks[seg]).float()[:, None].to(device)
    return F.interpolate(target, size=(size, size), mode="nearest-exact")[:, 0]


@torch.no_grad()
def ground_features(model: VirstModel, sample: Sample) -> GroundFeatures:
    cfg, device = model.config, model.device
    plan = plan_frames(len(sample.frames), cfg, seed=sample.seed)
    seg = list(plan.seg)
    feats = encode_batch(model.sam2, to_model_input(
        sample.frames[seg], cfg.sam_image_size, cfg.sam_resize, device))
    video_tokens = model.vlm.encode_video(to_model_input(
        sample.frames[list(plan.vlm)], cfg.vlm_image_size, cfg.vlm_resize, device))
    cells = [F.adaptive_avg_pool2d(_targets_at(m, seg, cfg.sam_image_size, device)[:, None],
                                   cfg.stf_grid)[:, 0] for m in sample.masks]
    # a copy: what is kept must not hold the batch's high-resolution levels alive
    return GroundFeatures(feats.level2[None].clone(), video_tokens, cells)


def _language_losses(model: VirstModel, texts: list[str], video_tokens, level2, parts):
    """One prefill of every expression; adds each one's token (and, with the scratch
    losses, expression) loss to `parts`; returns each one's [SEG] states (1, N, hidden)."""
    seg_id = model.tokenizer.token_to_id(SEG_TOKEN)
    device = video_tokens.device
    prompts = [build_prompt(model.tokenizer, t, model.config.num_seg_tokens) for t in texts]
    # one prefill for every expression: each module runs once per sample (FSDP2 ranks
    # must make the same calls), and it is faster
    hidden, positions = model.prefill(prompts, video_tokens, level2, full=True)
    seg_states = []
    for e, prompt in enumerate(prompts):
        pos, labels = answer_targets(prompt, video_tokens.shape[0], seg_id)
        logits = model.vlm.lm_head(hidden[e, pos])
        parts["token"].append(F.cross_entropy(logits.float(), torch.tensor(labels, device=device),
                                              ignore_index=IGNORE))
        if "expression" in parts:
            words = model.tokenizer.encode(normalize_expression(texts[e]),
                                           add_special_tokens=False).ids
            seg_logits = model.vlm.lm_head(hidden[e, positions[e]].mean(0))
            parts["expression"].append(expression_words(seg_logits, sorted(set(words))))
        seg_states.append(hidden[e : e + 1, positions[e]])
    return seg_states


def ground_losses(model: VirstModel, sample: Sample) -> dict[str, torch.Tensor]:
    """"ground" mode (ours, `grounding_only`): where STF looks and nothing else, no mask
    decoder: the token, expression and grounding losses on the frozen encoders' features
    (`sample.features` when the trainer kept them)."""
    f = sample.features or ground_features(model, sample)
    parts: dict[str, list] = {"token": [], "expression": [], "grounding": []}
    seg_states = _language_losses(model, sample.texts, f.video_tokens, f.level2, parts)
    for seg_hidden, cells in zip(seg_states, f.cells):
        _, attention = model.seg_prompter(seg_hidden, f.level2, return_attention=True)
        parts["grounding"].append(grounding(attention, cells, model.config.stf_grid))
    return {k: torch.stack(v).mean() for k, v in parts.items()}


CLICK_MODES = ("clicks", "click_propagate")
CLICK_FRAMES = 2  # frames of one video per click sample: batches mix several videos


def forward_losses(model: VirstModel, sample: Sample, mode: str,
                   scratch_losses: bool = False) -> dict[str, torch.Tensor]:
    """Mean losses over the sample: bce, dice, iou (frames with the object), occlusion (all
    supervised frames) and token (the answer text; expression modes only).

    Expression modes (the VLM and STF run): "anchors" (every segmentation frame predicted
    from its STF prompt), "propagate" (3 random anchors, SAM2 memory over the frames
    around them). Click modes (SAM2 alone, its own training in miniature): "clicks" (a
    random object per frame, a click and a corrective click), "click_propagate" (one
    object clicked on 3 random anchors, propagated). `scratch_losses` adds the "expression"
    and "grounding" losses (losses.py) for a language model and STF trained from scratch.
    "ground" (the VLM and STF, no mask decoder): `ground_losses`."""
    if mode == "ground":
        return ground_losses(model, sample)
    cfg, device = model.config, model.device
    rng = np.random.default_rng(sample.seed)
    plan = plan_frames(len(sample.frames), cfg, seed=sample.seed)
    seg = list(plan.seg)
    if mode == "clicks":  # a few frames: the trainer mixes several videos per step
        seg = sorted(rng.choice(seg, size=min(CLICK_FRAMES, len(seg)), replace=False).tolist())
    feats = encode_batch(model.sam2, to_model_input(
        sample.frames[seg], cfg.sam_image_size, cfg.sam_resize, device))
    size = cfg.sam_image_size
    parts: dict[str, list] = {k: [] for k in ("bce", "dice", "iou", "occlusion", "token")}
    if scratch_losses and mode not in CLICK_MODES:
        parts["expression"], parts["grounding"] = [], []
    zero = feats.vision[-1].sum() * 0
    if mode in CLICK_MODES:
        objects = sample.click_targets()
        if mode == "clicks":
            per_frame = [_visible_object(objects[:, [f]], [0], rng) for f in seg]
            masks = np.stack([objects[o, f] if o is not None else np.zeros_like(objects[0, f])
                              for o, f in zip(per_frame, seg)])
            click_losses(model, feats, _targets_at(masks, list(range(len(seg))), size, device),
                         rng, parts)
        else:
            obj = _visible_object(objects, seg, rng, min_frames=3)
            if obj is not None:
                target = _targets_at(objects[obj], seg, size, device)
                visible = [t for t in range(len(seg)) if bool(target[t].any())]

                def click_prompt(a):
                    a = a if a in visible else int(rng.choice(visible))
                    return click_tokens(model.sam2, [[_pixel(target[a] > 0.5, rng)]], [[1]])

                propagate_losses(model, feats, target, click_prompt, rng, parts)
        return {k: torch.stack(v).mean() if v else zero for k, v in parts.items()}
    video_tokens = model.vlm.encode_video(to_model_input(
        sample.frames[list(plan.vlm)], cfg.vlm_image_size, cfg.vlm_resize, device))
    level2 = feats.level2[None]  # (1, T, C, h, w)
    seg_states = _language_losses(model, sample.texts, video_tokens, level2, parts)
    for seg_hidden, mask in zip(seg_states, sample.masks):
        target = _targets_at(mask, seg, size, device)
        if scratch_losses:
            prompt_tokens, attention = model.stf_prompts(seg_hidden, level2,
                                                         return_attention=True)
            parts["grounding"].append(grounding(attention, target, cfg.stf_grid))
        else:
            prompt_tokens = model.stf_prompts(seg_hidden, level2)
        if mode == "anchors":
            heads = _split(anchor_heads(model.sam2, feats, prompt_tokens[0].transpose(0, 1)))
            _accumulate(parts, heads, target, size)
        else:
            propagate_losses(model, feats, target, lambda a, p=prompt_tokens: p[:, :, a], rng,
                             parts)
    zero = video_tokens.sum() * 0
    return {k: torch.stack(v).mean() if v else zero for k, v in parts.items()}
