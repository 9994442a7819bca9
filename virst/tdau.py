"""Temporal Dynamic Anchor Updater: anchor frames predicted from the STF prompts, every other
frame propagated with SAM2's memory (DESIGN.md section 1, items 9-11).

The memory selection is an explicit, pure-Python `MemoryPlan` so that the optimized runtime
can reuse it with fixed-size buffers; the tests prove that conditioning on a plan reproduces
`SAM2Base._prepare_memory_conditioned_features` (sam2 1.1.0) to the last bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_base import NO_OBJ_SCORE, SAM2Base
from sam2.modeling.sam2_utils import get_1d_sine_pe

# ------------------------------------------------------------------------------ anchors


def anchor_indices(t_seg: int, frames_per_anchor: int = 4) -> list[int]:
    """K = max(1, T_seg // 4) positions round(linspace(0, T_seg - 1, K)), half to even.

    Evaluated exactly as the release does, in float32 `torch.linspace`: for T_seg = 94 that
    puts anchor 11 at 47 where exact arithmetic (46.5, half to even) would give 46.
    """
    if t_seg < 1:
        raise ValueError(f"anchor_indices needs at least one segmentation frame, got {t_seg}")
    k = max(1, t_seg // frames_per_anchor)
    positions = torch.linspace(0, t_seg - 1, steps=k, dtype=torch.float32, device="cpu")
    return positions.round().long().tolist()


# -------------------------------------------------------------------------- memory plan


@dataclass(frozen=True)
class MemoryPlan:
    """What frame `frame` attends to, in the order SAM2 concatenates it.

    anchors:  attended anchor frames (temporal slot 0 of `maskmem_tpos_enc`);
    previous: (t_pos, frame) pairs, t_pos = num_maskmem - distance, for the previous frames;
    pointers: (signed distance, frame) pairs whose object pointers are attended.
    """

    frame: int
    anchors: tuple[int, ...]
    previous: tuple[tuple[int, int], ...]
    pointers: tuple[tuple[int, int], ...]

    @property
    def spatial(self) -> list[tuple[int, int]]:
        """(t_pos, frame) of every spatial memory, anchors first."""
        return [(0, a) for a in self.anchors] + list(self.previous)


def closest_anchors(frame: int, anchors: Sequence[int], limit: int) -> list[int]:
    """SAM2's `select_closest_cond_frames`: the closest anchor before, the closest at/after,
    then the nearest others (ties: earlier first) up to `limit`."""
    anchors = list(anchors)
    if len(anchors) <= limit:
        return anchors
    before = [a for a in anchors if a < frame]
    after = [a for a in anchors if a >= frame]
    chosen = ([max(before)] if before else []) + ([min(after)] if after else [])
    rest = sorted((a for a in anchors if a not in chosen), key=lambda a: abs(a - frame))
    return chosen + rest[: limit - len(chosen)]


def select_memory(frame: int, anchors: Sequence[int], num_frames: int, *, num_maskmem: int = 7,
                  max_anchors: int = 3, max_obj_ptrs: int = 16) -> MemoryPlan:
    """The memory of non-anchor frame `frame` when propagating forward over `num_frames`.

    `anchors` are the anchor frames in ascending order. An anchor that is not among the
    attended ones still serves as an ordinary previous frame (spatial memory and pointer).
    """
    chosen = closest_anchors(frame, anchors, max_anchors)

    def is_plain(f: int) -> bool:  # earlier frame not already attended as an anchor
        return 0 <= f < frame and f not in chosen

    previous = tuple(
        (t_pos, frame - (num_maskmem - t_pos))
        for t_pos in range(1, num_maskmem)
        if is_plain(frame - (num_maskmem - t_pos))
    )
    pointers = [(frame - a, a) for a in chosen if a <= frame]
    for dist in range(1, min(num_frames, max_obj_ptrs)):
        if frame - dist < 0:
            break
        if is_plain(frame - dist):
            pointers.append((dist, frame - dist))
    return MemoryPlan(frame, tuple(chosen), previous, tuple(pointers))


# ------------------------------------------------------------------ per-frame SAM2 steps


@dataclass
class FrameFeatures:
    """One frame's SAM2 image features in SAM2's flattened (HW, 1, C) layout, 3 levels."""

    vision: list[torch.Tensor]
    pos: list[torch.Tensor]
    sizes: list[tuple[int, int]]

    @staticmethod
    def _grid(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return x.permute(1, 2, 0).reshape(x.shape[1], x.shape[2], *size)

    @property
    def level2(self) -> torch.Tensor:
        """(1, C, h, w): the feature map STF and the mask decoder read."""
        return self._grid(self.vision[-1], self.sizes[-1])

    @property
    def high_res(self) -> list[torch.Tensor]:
        return [self._grid(v, s) for v, s in zip(self.vision[:-1], self.sizes[:-1])]

    def select(self, b: int) -> FrameFeatures:
        """Frame b of a batch, as a batch of one."""
        return self.take([b])

    def take(self, frames: list[int]) -> FrameFeatures:
        """Frames of a batch, as a smaller batch."""
        return FrameFeatures([v[:, frames] for v in self.vision],
                             [p[:, frames] for p in self.pos], self.sizes)


def encode_batch(sam: SAM2Base, pixels: torch.Tensor) -> FrameFeatures:
    """Run the image encoder (and the decoder's conv_s0/s1) on (B, 3, S, S) pixels."""
    _, vision, pos, sizes = sam._prepare_backbone_features(sam.forward_image(pixels))
    # SAM2's FPN upsamples in fp32, so a bf16/fp16 model's level 2 comes out fp32
    vision, pos = [v.to(pixels.dtype) for v in vision], [p.to(pixels.dtype) for p in pos]
    return FrameFeatures(vision, pos, sizes)


def encode_frames(sam: SAM2Base, pixels: torch.Tensor) -> list[FrameFeatures]:
    """`encode_batch`, split into one batch-1 `FrameFeatures` per frame."""
    batch = encode_batch(sam, pixels)
    return [batch.select(b) for b in range(pixels.shape[0])]


@dataclass
class FrameOutput:
    """What a frame leaves in the memory bank and what it shows the user."""

    maskmem: torch.Tensor  # (1, mem_dim, h, w), stored in bf16 when the config says so
    maskmem_pos: torch.Tensor  # (1, mem_dim, h, w)
    obj_ptr: torch.Tensor  # (1, C)
    low_res: torch.Tensor  # (1, 1, 4h, 4w) mask logits
    obj_score: torch.Tensor  # (1, 1); <= 0 means the object is absent
    ious: torch.Tensor | None = None  # (1, 3) predicted IoU of the 3 candidate masks
    candidates: torch.Tensor | None = None  # (1, 3, 4h, 4w) raw logits (training losses)


@dataclass
class HeadOutput:
    low_res: torch.Tensor  # best candidate, no-object frames set to NO_OBJ_SCORE
    high_res: torch.Tensor
    obj_ptr: torch.Tensor
    obj_score: torch.Tensor
    ious: torch.Tensor
    candidates: torch.Tensor  # the 3 raw candidates, before the no-object replacement


def _fp32_prompt_encoder(sam: SAM2Base):
    """SAM2's prompt encoder in fp32: its random-Fourier position encoding casts coordinates
    to fp32 before the projection, so a bf16/fp16 model runs a (small) fp32 copy of it."""
    encoder = sam.sam_prompt_encoder
    return encoder if sam.no_mem_embed.dtype == torch.float32 else copy.deepcopy(encoder).float()


def dense_pe(sam: SAM2Base) -> torch.Tensor:
    """(1, C, h, w) position encoding of the decoder's image grid, in the model's dtype."""
    return _fp32_prompt_encoder(sam).get_dense_pe().to(sam.no_mem_embed.dtype)


def _point_tokens(sam: SAM2Base, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SAM2's prompt encoder on points, in the model's dtype."""
    sparse, _ = _fp32_prompt_encoder(sam)(points=(points, labels), boxes=None, masks=None)
    return sparse.to(sam.no_mem_embed.dtype)


def no_prompt_tokens(sam: SAM2Base) -> torch.Tensor:
    """The constant sparse prompt SAM2 uses on tracked frames (an empty padded point): (1, 2, C)."""
    device = sam.no_mem_embed.device
    coords = torch.zeros(1, 1, 2, device=device)
    return _point_tokens(sam, coords, -torch.ones(1, 1, dtype=torch.int32, device=device))


def click_tokens(sam: SAM2Base, points, labels) -> torch.Tensor:
    """Clicks (F, k, 2) x/y at model resolution and labels (F, k) (1 positive, 0 negative)
    as SAM2's sparse prompt tokens (F, k + 1, C); the prompt encoder pads one point."""
    device = sam.no_mem_embed.device
    pts = torch.as_tensor(points, dtype=torch.float32, device=device)
    return _point_tokens(sam, pts, torch.as_tensor(labels, dtype=torch.int32, device=device))


def decode_masks(sam: SAM2Base, pix_feat: torch.Tensor, high_res: list[torch.Tensor],
                 sparse: torch.Tensor, image_pe: torch.Tensor | None = None) -> HeadOutput:
    """SAM2's mask head, multimask, best of masks 1..3 by predicted IoU, occlusion handling.

    `sparse` replaces the prompt encoder's sparse embeddings: the 10 STF tokens on anchors,
    `no_prompt_tokens` elsewhere. Dense prompt = `no_mask_embed`.
    """
    b, _, h, w = pix_feat.shape
    encoder = sam.sam_prompt_encoder
    dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, h, w)
    low, ious, tokens, score = sam.sam_mask_decoder(
        image_embeddings=pix_feat, image_pe=dense_pe(sam) if image_pe is None else image_pe,
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        multimask_output=True, repeat_image=False, high_res_features=high_res,
    )
    appearing = score > 0
    candidates = low.float()
    low = torch.where(appearing[:, None, None], candidates, NO_OBJ_SCORE)
    # upsample all three, then pick, as SAM2 does: bilinear kernels vectorise over channels,
    # so picking first differs from SAM2 in the last bit at some thread counts
    high = F.interpolate(low, size=(sam.image_size, sam.image_size), mode="bilinear",
                         align_corners=False)
    rows = torch.arange(b, device=low.device)
    best = ious.argmax(dim=-1)
    low, high = low[rows, best].unsqueeze(1), high[rows, best].unsqueeze(1)
    present = appearing.to(tokens.dtype)
    ptr = present * sam.obj_ptr_proj(tokens[rows, best]) + (1 - present) * sam.no_obj_ptr
    return HeadOutput(low, high, ptr, score, ious, candidates)


def encode_memory(sam: SAM2Base, feats: FrameFeatures, head: HeadOutput,
                  bf16_storage: bool) -> FrameOutput:
    """SAM2's memory encoder on the chosen mask (sigmoid * 20 - 10, no-object embedding)."""
    # masks are fp32 (as SAM2 keeps them); a bf16/fp16 memory encoder reads them in its dtype
    maskmem, pos = sam._encode_new_memory(
        current_vision_feats=feats.vision, feat_sizes=feats.sizes,
        pred_masks_high_res=head.high_res.to(feats.vision[-1].dtype),
        object_score_logits=head.obj_score,
        is_mask_from_pts=False,
    )
    if bf16_storage:
        maskmem = maskmem.to(torch.bfloat16)
    return FrameOutput(maskmem, pos[-1], head.obj_ptr, head.low_res, head.obj_score,
                       head.ious, head.candidates)


def anchor_heads(sam: SAM2Base, feats: FrameFeatures, prompt: torch.Tensor,
                 image_pe: torch.Tensor | None = None) -> HeadOutput:
    """Anchor frames, SAM-like: features + no_mem_embed, prompt tokens as the sparse prompt.
    Batched: `feats` and `prompt` (B, N, C) may hold several frames."""
    pix = FrameFeatures._grid(feats.vision[-1] + sam.no_mem_embed, feats.sizes[-1])
    return decode_masks(sam, pix, feats.high_res, prompt, image_pe)


def predict_anchor(sam: SAM2Base, feats: FrameFeatures, prompt: torch.Tensor,
                   bf16_storage: bool = True, image_pe: torch.Tensor | None = None
                   ) -> FrameOutput:
    """One anchor frame's prediction and its memory."""
    return encode_memory(sam, feats, anchor_heads(sam, feats, prompt, image_pe), bf16_storage)


def pointer_tokens(sam: SAM2Base, plan: MemoryPlan, bank: dict[int, FrameOutput],
                   num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Object pointers of the plan as (4p, 1, mem_dim) tokens and their temporal encodings.
    `sam` only lends its constants (any object with the same attributes will do)."""
    dist = [d for d, _ in plan.pointers]
    ptrs = torch.stack([bank[f].obj_ptr for _, f in plan.pointers])  # (p, 1, C)
    c, mem = sam.hidden_dim, sam.mem_dim
    t_max = min(num_frames, sam.max_obj_ptrs_in_encoder) - 1
    pos = torch.tensor(dist, device=ptrs.device) / t_max
    pos = sam.obj_ptr_tpos_proj(get_1d_sine_pe(pos, dim=c))[:, None, :]  # (p, 1, mem)
    split = c // mem
    ptrs = ptrs.reshape(-1, 1, split, mem).permute(0, 2, 1, 3).flatten(0, 1)
    return ptrs, pos.repeat_interleave(split, dim=0)


def gather_memory(sam: SAM2Base, plan: MemoryPlan, bank: dict[int, FrameOutput],
                  num_frames: int, dtype: torch.dtype):
    """The plan's memories in SAM2's order: (M, 1, mem_dim) tokens, their encodings, and
    how many of the last ones are object-pointer tokens. `sam` lends constants only."""
    memory, memory_pos = [], []
    for t_pos, f in plan.spatial:
        out = bank[f]
        memory.append(out.maskmem.to(dtype).flatten(2).permute(2, 0, 1))
        enc = out.maskmem_pos.flatten(2).permute(2, 0, 1)
        memory_pos.append(enc + sam.maskmem_tpos_enc[sam.num_maskmem - t_pos - 1])
    num_ptr_tokens = 0
    if plan.pointers:
        ptrs, ptr_pos = pointer_tokens(sam, plan, bank, num_frames)
        memory.append(ptrs)
        memory_pos.append(ptr_pos)
        num_ptr_tokens = ptrs.shape[0]
    return torch.cat(memory), torch.cat(memory_pos), num_ptr_tokens


def condition_on_memory(sam: SAM2Base, feats: FrameFeatures, plan: MemoryPlan,
                        bank: dict[int, FrameOutput], num_frames: int) -> torch.Tensor:
    """Memory attention of the current frame over the plan's memories: (1, C, h, w)."""
    memory, memory_pos, num_ptr_tokens = gather_memory(sam, plan, bank, num_frames,
                                                       feats.vision[-1].dtype)
    out = sam.memory_attention(
        curr=feats.vision[-1:], curr_pos=feats.pos[-1:], memory=memory,
        memory_pos=memory_pos, num_obj_ptr_tokens=num_ptr_tokens,
    )
    return FrameFeatures._grid(out, feats.sizes[-1])


def track_frame(sam: SAM2Base, feats: FrameFeatures, plan: MemoryPlan,
                bank: dict[int, FrameOutput], num_frames: int, no_prompt: torch.Tensor,
                bf16_storage: bool = True, image_pe: torch.Tensor | None = None
                ) -> FrameOutput:
    """One propagated (non-anchor) frame."""
    pix = condition_on_memory(sam, feats, plan, bank, num_frames)
    head = decode_masks(sam, pix, feats.high_res, no_prompt, image_pe)
    return encode_memory(sam, feats, head, bf16_storage)


# ----------------------------------------------------------------------- whole video


class TorchSam2Steps:
    """The SAM2 calls propagation makes, on the reference modules (`propagate` takes any
    object with these members; the runtime's backends run fused steps instead)."""

    def __init__(self, sam: SAM2Base, bf16_storage: bool = True):
        self.sam, self.bf16_storage = sam, bf16_storage
        self.num_maskmem = sam.num_maskmem
        self.max_anchors = sam.max_cond_frames_in_attn
        self.max_obj_ptrs = sam.max_obj_ptrs_in_encoder
        self._no_prompt = None
        # the decoder's grid encoding, once per video: SAM2 makes it again for every frame,
        # which a bf16 model would pay with an fp32 copy of the prompt encoder (3 ms each
        # on this CPU at virst-7b's size)
        self._image_pe = None

    def _pe(self) -> torch.Tensor:
        if self._image_pe is None:
            self._image_pe = dense_pe(self.sam)
        return self._image_pe

    def encode(self, pixels: torch.Tensor) -> list[FrameFeatures]:
        return encode_frames(self.sam, pixels)

    def anchor(self, feats: FrameFeatures, prompt: torch.Tensor) -> FrameOutput:
        return predict_anchor(self.sam, feats, prompt, self.bf16_storage, self._pe())

    def track(self, feats: FrameFeatures, plan: MemoryPlan, bank: dict[int, FrameOutput],
              num_frames: int) -> FrameOutput:
        if self._no_prompt is None:
            self._no_prompt = no_prompt_tokens(self.sam)
        return track_frame(self.sam, feats, plan, bank, num_frames, self._no_prompt,
                           self.bf16_storage, self._pe())


def propagate(steps, features: Callable[[int], object], prompts: dict[int, torch.Tensor],
              num_frames: int) -> Iterator[tuple[int, FrameOutput]]:
    """Anchors first (each independently), then every frame 0..num_frames-1 in order.

    `steps`: a `TorchSam2Steps` (or another backend with the same members); `prompts` maps
    anchor video frames to their (1, N, C) prompt tokens. Yields each frame's output as
    soon as it is known; non-anchor outputs no plan can reach again are dropped.
    """
    if not prompts:
        raise ValueError("propagate needs at least one anchor frame")
    anchors = sorted(prompts)
    bank = {a: steps.anchor(features(a), prompts[a]) for a in anchors}
    horizon = max(steps.num_maskmem - 1, steps.max_obj_ptrs - 1)
    for t in range(num_frames):
        if t not in bank:
            plan = select_memory(t, anchors, num_frames, num_maskmem=steps.num_maskmem,
                                 max_anchors=steps.max_anchors, max_obj_ptrs=steps.max_obj_ptrs)
            bank[t] = steps.track(features(t), plan, bank, num_frames)
        yield t, bank[t]
        stale = t - horizon
        if stale >= 0 and stale not in prompts:
            bank.pop(stale, None)
