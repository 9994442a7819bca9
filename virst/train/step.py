"""One training step's forward pass: a video, its expressions, the stage's losses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from virst.model import VirstModel
from virst.preprocess import to_model_input
from virst.prompt import SEG_TOKEN, Prompt, build_prompt
from virst.sampling import plan_frames
from virst.tdau import HeadOutput, TorchSam2Steps, anchor_heads, encode_batch, propagate
from virst.train.losses import IGNORE, frame_losses


@dataclass
class Sample:
    """A training video with its expressions and their ground-truth masks."""

    frames: np.ndarray  # (L, H, W, 3) uint8
    texts: list[str]
    masks: list[np.ndarray]  # one (L, H, W) bool per expression
    seed: int  # frame sampling and anchor choice


def shapes_sample(index: int) -> Sample:
    from virst.data.shapes import make_video

    v = make_video("train", index)
    return Sample(v.frames, [t for t, _, _ in v.expressions],
                  [v.masks[objs].any(axis=0) for _, objs, _ in v.expressions], index)


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


def point_prompts(model: VirstModel, targets: torch.Tensor, rng: np.random.Generator):
    """One random click inside the object on each frame where it is visible, embedded by
    SAM2's prompt encoder: (frames with the object, sparse (F, 2, C)). This is how SAM2
    itself is trained, and how a from-scratch mask decoder learns to follow its sparse
    prompt before the STF tokens carry anything (our stand-in for SAM2 pretraining)."""
    frames = [t for t in range(targets.shape[0]) if bool(targets[t].any())]
    coords = []
    for t in frames:
        ys, xs = torch.nonzero(targets[t] > 0.5, as_tuple=True)
        k = int(rng.integers(len(ys)))
        coords.append([float(xs[k]), float(ys[k])])
    device = targets.device
    pts = torch.tensor(coords, device=device).reshape(-1, 1, 2)
    labels = torch.ones(len(frames), 1, dtype=torch.int32, device=device)
    sparse, _ = model.sam2.sam_prompt_encoder(points=(pts, labels), boxes=None, masks=None)
    return frames, sparse


def forward_losses(model: VirstModel, sample: Sample, mode: str) -> dict[str, torch.Tensor]:
    """Mean losses over the sample's expressions: bce, dice, iou (frames with the object),
    occlusion (all supervised frames) and token (the answer text).

    mode: "anchors" (every segmentation frame predicted from its STF prompt), "propagate"
    (3 random anchors, SAM2 memory over the frames around them) or "points" (the mask
    decoder from a click in the object; the LLM and STF still get the token loss)."""
    cfg, device = model.config, model.device
    rng = np.random.default_rng(sample.seed)
    plan = plan_frames(len(sample.frames), cfg, seed=sample.seed)
    video_tokens = model.vlm.encode_video(to_model_input(
        sample.frames[list(plan.vlm)], cfg.vlm_image_size, cfg.vlm_resize, device))
    seg = list(plan.seg)
    feats = encode_batch(model.sam2, to_model_input(
        sample.frames[seg], cfg.sam_image_size, cfg.sam_resize, device))
    level2 = feats.level2[None]  # (1, T, C, h, w)
    seg_id = model.tokenizer.token_to_id(SEG_TOKEN)
    size = cfg.sam_image_size
    parts: dict[str, list] = {k: [] for k in ("bce", "dice", "iou", "occlusion", "token")}
    for text, mask in zip(sample.texts, sample.masks):
        target = torch.from_numpy(mask[seg]).float()[:, None].to(device)
        target = F.interpolate(target, size=(size, size), mode="nearest-exact")[:, 0]
        prompt = build_prompt(model.tokenizer, text, cfg.num_seg_tokens)
        hidden, positions = model.prefill(prompt, video_tokens, level2, full=True)
        pos, labels = answer_targets(prompt, video_tokens.shape[0], seg_id)
        logits = model.vlm.lm_head(hidden[0, pos])
        parts["token"].append(F.cross_entropy(logits.float(), torch.tensor(labels, device=device),
                                              ignore_index=IGNORE))
        if mode == "points":
            frames, sparse = point_prompts(model, target, rng)
            if frames:
                heads = _split(anchor_heads(model.sam2, feats.take(frames), sparse))
                _accumulate(parts, heads, target[frames], size)
            continue
        prompts = model.seg_prompter(hidden[:, positions], level2)  # (1, N, T, C)
        if mode == "anchors":
            heads = _split(anchor_heads(model.sam2, feats, prompts[0].transpose(0, 1)))
            _accumulate(parts, heads, target, size)
        else:
            t = len(seg)
            anchors = sorted(rng.choice(t, size=min(3, t), replace=False).tolist())
            frames = keyframes(t, anchors)
            local = {frames.index(a): prompts[:, :, a] for a in anchors}
            steps = TorchSam2Steps(model.sam2, bf16_storage=False)
            outs = dict(propagate(steps, lambda i, f=frames: feats.select(f[i]), local,
                                  len(frames)))
            heads = [HeadOutput(o.low_res, None, o.obj_ptr, o.obj_score, o.ious, o.candidates)
                     for _, o in sorted(outs.items())]
            _accumulate(parts, heads, target[frames], size)
    zero = video_tokens.sum() * 0
    return {k: torch.stack(v).mean() if v else zero for k, v in parts.items()}
