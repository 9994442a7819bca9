"""The TDAU memory bank in fixed-size buffers, for B objects propagated together.

    spatial   (B, K + R, h*w, Cm)  K anchor slots, then a ring of R = num_maskmem - 1
                                    previous frames (frame t in slot K + t % R)
    pointers  (B, K + Q, C)        K anchor pointers, then a ring of Q = max_obj_ptrs - 1

What each frame attends to is SAM2's selection (`virst.tdau.select_memory`, the reference),
turned into index tables on the device, INDEX_WINDOW frames at a time: slot indices,
temporal-encoding rows and validity of the fixed `S = max_memory_frames` spatial and
`P = max_pointer_frames` pointer entries of each frame, and the temporal encodings of its
pointers. The frame loop only gathers rows, and every INDEX_WINDOW frames builds the next
tables on the host (about 8 ms for 256 frames here; on a GPU copied from pinned memory,
without a host synchronisation: unmeasured, no GPU lent). Nothing is held per frame of the
video (tables for all frames of a one-hour video were 62 MB and took 18 s before its first
mask).

The same selection says which anchors' spatial memory is ever read (`anchors_read`):
the others skip the memory encoder, the larger half of an anchor step (the whole of it
when every frame is an anchor, as in a clip of at most 64 frames with the embedded model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sam2.modeling.sam2_utils import get_1d_sine_pe

from runtime.backends.base import StepOutput, TrackInputs
from virst.config import VirstConfig
from virst.preprocess import to_device
from virst.tdau import select_memory

INDEX_WINDOW = 256  # frames whose index tables are held at once


@dataclass
class FrameIndex:
    """Index tables of the frames `start` .. `start + W - 1`: (W, S) and (W, P)."""

    start: int
    spatial: torch.Tensor  # slot per spatial entry
    tpos: torch.Tensor  # row of maskmem_tpos_enc per spatial entry
    spatial_valid: torch.Tensor
    pointer: torch.Tensor  # slot per pointer entry
    pointer_pos: torch.Tensor  # (W, P, C) temporal encoding per pointer entry
    pointer_valid: torch.Tensor
    counts: np.ndarray  # (W, 2) on the host: real spatial and pointer entries, first in rows

    def holds(self, frame: int) -> bool:
        return 0 <= frame - self.start < len(self.spatial)


def _plans(cfg: VirstConfig, anchors: list[int], num_frames: int, frames: range):
    """SAM2's memory selection of each tracked frame in `frames` (anchors are predicted)."""
    is_anchor = set(anchors)
    for t in frames:
        if t not in is_anchor:
            yield t, select_memory(t, anchors, num_frames, num_maskmem=cfg.num_maskmem,
                                   max_anchors=cfg.max_anchors_in_attn,
                                   max_obj_ptrs=cfg.max_obj_ptrs)


def anchors_read(cfg: VirstConfig, anchors: list[int], num_frames: int) -> frozenset[int]:
    """Anchor frames whose spatial memory some tracked frame reads."""
    is_anchor = set(anchors)
    return frozenset(f for _, plan in _plans(cfg, anchors, num_frames, range(num_frames))
                     for _, f in plan.spatial if f in is_anchor)


def index_tables(cfg: VirstConfig, constants: dict, anchors: list[int], num_frames: int,
                 frames: range, device: torch.device, dtype: torch.dtype) -> FrameIndex:
    """SAM2's memory selection of `frames` as slot indices into the bank's buffers."""
    k, r, q = len(anchors), cfg.num_maskmem - 1, cfg.max_obj_ptrs - 1
    slot_of = {a: i for i, a in enumerate(anchors)}
    n, s_max, p_max = len(frames), cfg.max_memory_frames, cfg.max_pointer_frames
    spatial, tpos, pointer, distance = (np.zeros((n, m), np.int64)
                                        for m in (s_max, s_max, p_max, p_max))
    s_valid, p_valid = np.zeros((n, s_max), np.float32), np.zeros((n, p_max), np.float32)
    for t, plan in _plans(cfg, anchors, num_frames, frames):
        i = t - frames.start
        entries = [(slot_of[a], 0) for a in plan.anchors]
        entries += [(k + f % r, t_pos) for t_pos, f in plan.previous]
        for j, (slot, t_pos) in enumerate(entries):
            spatial[i, j], tpos[i, j] = slot, cfg.num_maskmem - t_pos - 1
        s_valid[i, : len(entries)] = 1
        for j, (dist, f) in enumerate(plan.pointers):
            pointer[i, j] = slot_of[f] if f in plan.anchors else k + f % q
            distance[i, j] = dist
        p_valid[i, : len(plan.pointers)] = 1
    on_device = [to_device(torch.from_numpy(a), device)
                 for a in (spatial, tpos, s_valid, pointer, distance, p_valid)]
    pointer_pos = pointer_encodings(constants, cfg, num_frames, on_device[4]).to(dtype)
    counts = np.stack([s_valid.sum(1), p_valid.sum(1)], axis=1).astype(np.int64)
    return FrameIndex(frames.start, *on_device[:4], pointer_pos, on_device[5], counts)


def pointer_encodings(constants: dict, cfg: VirstConfig, num_frames: int,
                      distance: torch.Tensor) -> torch.Tensor:
    """(..., Cm): SAM2's signed temporal encoding of object pointers `distance` frames
    back, normalised by min(num_frames, max_obj_ptrs) - 1, through `obj_ptr_tpos_proj`."""
    t_max = max(1, min(num_frames, cfg.max_obj_ptrs) - 1)
    dist = distance.to(torch.float32).flatten() / t_max
    w = constants["obj_ptr_tpos_proj.weight"].to(distance.device, torch.float32)
    b = constants["obj_ptr_tpos_proj.bias"].to(distance.device, torch.float32)
    enc = torch.nn.functional.linear(get_1d_sine_pe(dist, dim=cfg.sam_dim), w, b)
    return enc.view(*distance.shape, -1)


class MemoryBank:
    def __init__(self, cfg: VirstConfig, constants: dict, anchors: list[int], num_frames: int,
                 objects: int, device: torch.device, dtype: torch.dtype = torch.float32,
                 window: int = INDEX_WINDOW):
        k = len(anchors)
        hw = cfg.sam_feat_size**2
        storage = torch.bfloat16 if cfg.memory_bf16_storage else dtype
        self.cfg, self.dtype, self.anchors = cfg, dtype, list(anchors)
        self.anchor_slot = {a: i for i, a in enumerate(anchors)}
        self.ring, self.pointer_ring = cfg.num_maskmem - 1, cfg.max_obj_ptrs - 1
        self.spatial = torch.zeros(objects, k + self.ring, hw, cfg.mem_dim, dtype=storage,
                                   device=device)
        self.pointers = torch.zeros(objects, k + self.pointer_ring, cfg.sam_dim, dtype=dtype,
                                    device=device)
        tpos = constants["maskmem_tpos_enc"].to(device, dtype)
        self.tpos = tpos.reshape(cfg.num_maskmem, cfg.mem_dim)
        self.constants, self.num_frames, self.device, self.window = (constants, num_frames,
                                                                     device, window)
        self.index: FrameIndex | None = None
        # anchor frames whose spatial memory a tracked frame reads; only these need it
        self.anchors_read = anchors_read(cfg, self.anchors, num_frames)

    def _index(self, frame: int) -> FrameIndex:
        """The tables of the window holding `frame` (the next window's, once it leaves)."""
        if self.index is None or not self.index.holds(frame):
            frames = range(frame, min(frame + self.window, self.num_frames))
            self.index = index_tables(self.cfg, self.constants, self.anchors,
                                      self.num_frames, frames, self.device, self.dtype)
        return self.index

    def _store(self, frame: int, slot: int, ptr_slot: int, out: StepOutput) -> None:
        self.pointers[:, ptr_slot] = out.ptr
        if out.maskmem is None:  # only an anchor nobody reads may come without memory
            if frame in self.anchors_read or frame not in self.anchor_slot:
                raise RuntimeError(f"frame {frame}'s spatial memory is read but was not "
                                   f"computed")
            return
        b = self.spatial.shape[0]
        self.spatial[:, slot] = out.maskmem.reshape(b, self.cfg.mem_dim, -1).transpose(1, 2)

    def write_anchor(self, frame: int, out: StepOutput) -> None:
        slot = self.anchor_slot[frame]
        self._store(frame, slot, slot, out)

    def write_frame(self, frame: int, out: StepOutput) -> None:
        """Every frame (anchor or tracked) enters the previous-frame and pointer rings."""
        k = len(self.anchors)
        self._store(frame, k + frame % self.ring, k + frame % self.pointer_ring, out)

    def inputs(self, frame: int, compact: bool = False) -> TrackInputs:
        """The memory `frame` attends: padded to the fixed bounds with validity masks, or
        `compact`, its real entries only, without masks (their counts are known on the
        host: no synchronisation). Compact is for units that take any memory size: masked
        attention ran 4.3x slower than unmasked on an H200 (cuDNN, 4096 x 37k keys)."""
        ix = self._index(frame)
        i, b = frame - ix.start, self.spatial.shape[0]
        if compact:
            s, p = (int(n) for n in ix.counts[i])
            spatial_valid = pointer_valid = None
        else:
            s, p = ix.spatial.shape[1], ix.pointer.shape[1]
            spatial_valid = ix.spatial_valid[i].to(self.dtype).expand(b, -1)
            pointer_valid = ix.pointer_valid[i].to(self.dtype).expand(b, -1)
        return TrackInputs(
            memory=self.spatial[:, ix.spatial[i, :s]].to(self.dtype),
            memory_tpos=self.tpos[ix.tpos[i, :s]].expand(b, -1, -1),
            memory_valid=spatial_valid,
            pointers=self.pointers[:, ix.pointer[i, :p]],
            pointer_pos=ix.pointer_pos[i, :p].expand(b, -1, -1),
            pointer_valid=pointer_valid)
