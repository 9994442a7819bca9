"""The training losses, each written once:

    L = 1.0 bce + 1.0 dice + 1.0 token-CE + 0.05 occlusion + 0.05 IoU

Mask losses follow the release (model/VIRST.py): bce and dice on the mask the model
outputs, i.e. the candidate with the highest predicted IoU, and the IoU head regresses that
mask's true IoU. Not SAM2's pretraining recipe (only the lowest-loss of the 3 candidates
trained): with prompts that carry nothing yet, that recipe lets a from-scratch decoder
learn to list three salient objects in its three slots and ignore the prompt for good.
Mask losses apply only to frames where the object is present (the occlusion head learns
presence); there the raw chosen candidate is trained even when the occlusion head says
"absent" (the release's mask is then the constant -1024 and gets no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from virst.stf import own_frame_attention

WEIGHTS = {"bce": 1.0, "dice": 1.0, "token": 1.0, "occlusion": 0.05, "iou": 0.05,
           "expression": 1.0, "grounding": 1.0}  # the last two: ours, from-scratch models only
IGNORE = -100


def sigmoid_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy per mask: (..., H, W) -> (...)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((-2, -1))


def dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per mask (smoothed by eps, as LISA/VIRST): (..., H, W) -> (...)."""
    p = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of thresholded masks (logit > 0) with the target: (..., H, W) -> (...)."""
    p, t = logits > 0, target > 0.5
    inter = (p & t).sum((-2, -1)).float()
    union = (p | t).sum((-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits (L, V) at positions 0..L-1 predict labels (L,)
    (already shifted; IGNORE marks positions without a target)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)


def occlusion(score: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """BCE of the object-score logit against presence of the object in the frame."""
    return F.binary_cross_entropy_with_logits(score.float(), present.float())


@dataclass
class FrameLosses:
    bce: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor
    occlusion: torch.Tensor


def frame_losses(candidates: torch.Tensor, ious: torch.Tensor, score: torch.Tensor,
                 target: torch.Tensor, size: int) -> FrameLosses:
    """Losses of one frame: candidates (3, h, w) raw logits, ious (3,), score (1,),
    target (size, size) float. The output mask is the candidate with the highest predicted
    IoU (the inference pick), upsampled to `size` as SAM2 does."""
    present = bool((target > 0.5).any())
    occ = occlusion(score.reshape(1), torch.tensor([float(present)], device=score.device))
    if not present:
        zero = candidates.sum() * 0
        return FrameLosses(zero, zero, zero, occ)
    chosen = ious.argmax()
    up = F.interpolate(candidates[chosen][None, None].float(), size=(size, size),
                       mode="bilinear", align_corners=False)[0, 0]
    iou = (ious[chosen].float() - mask_iou(up.detach(), target)).abs()
    return FrameLosses(sigmoid_bce(up, target), dice(up, target), iou, occ)


def expression_words(seg_logits: torch.Tensor, word_ids: list[int]) -> torch.Tensor:
    """Ours, for language models trained from scratch: the [SEG] states must name the
    expression's words. `seg_logits` (V,) = lm_head(mean [SEG] state); cross-entropy of
    each word of the expression. A pretrained LLM reads the expression into its [SEG]
    states by itself; a 2-layer one from scratch, whose [SEG] tokens attend to ~900 video
    tokens and a handful of words, gives every expression the same states (measured: cosine
    1.0000 after 1000 steps) and no mask loss can reach the expression through them."""
    logp = seg_logits.float().log_softmax(-1)
    return -logp[torch.tensor(word_ids, device=logp.device)].mean()


def grounding(attention: torch.Tensor, target: torch.Tensor, grid: int) -> torch.Tensor:
    """Ours, for STF trained from scratch: each STF query of frame t must attend to the grid
    cells of frame t that hold the target. `attention` (1, heads, N*T, T*grid^2) is the last
    cross-attention layer's (queries n-major, keys t-major), `target` (T, H, W) the masks.
    -log(attention mass on the target's cells), mean over heads, queries and the frames that
    show the target. Without it the mask loss, through a decoder that follows clicks, moved
    the STF prompt towards the named object too slowly (masks of different expressions
    agreed 0.93 after 2200 steps). It needs grid cells no larger than the objects: on a
    4 x 4 grid over shapes it taught "look at the objects", not the named one (MODEL_CARD.md)."""
    frames = target.shape[0]
    same = own_frame_attention(attention, frames)[0]  # (heads, N, T, g*g)
    cells = F.adaptive_avg_pool2d(target[:, None].float(), grid)[:, 0].flatten(1) > 0
    shown = cells.any(-1)
    if not bool(shown.any()):
        return attention.sum() * 0
    mass = (same * cells).sum(-1)[:, :, shown]
    return -mass.float().clamp_min(1e-6).log().mean()


def total(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(WEIGHTS[k] * v for k, v in parts.items())
