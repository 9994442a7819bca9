"""The TDAU memory bank in fixed-size buffers, for B objects propagated together.

    spatial   (B, K + R, h*w, Cm)  K anchor slots, then a ring of R = num_maskmem - 1
                                    previous frames (frame t in slot K + t % R)
    pointers  (B, K + Q, C)        K anchor pointers, then a ring of Q = max_obj_ptrs - 1

What each frame attends to is SAM2's selection (`virst.tdau.select_memory`, the reference),
turned once per video into index tables on the device: slot indices, temporal-encoding
rows and validity of the fixed `S = max_memory_frames` spatial and `P = max_pointer_frames`
pointer entries of every frame. The frame loop then only gathers rows; the temporal
encodings of pointers are computed once per video for every distance. Nothing in the loop
depends on host values, so a GPU never waits on the host inside it.

The same selection says which anchors' spatial memory is ever read (`FrameIndex.read`):
the others skip the memory encoder, the larger half of an anchor step (the whole of it
when every frame is an anchor, as in a clip of at most 64 frames with the embedded model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sam2.modeling.sam2_utils import get_1d_sine_pe

from runtime.backends.base import StepOutput, TrackInputs
from virst.config import VirstConfig
from virst.tdau import select_memory


@dataclass
class FrameIndex:
    """Index tables of every frame of a video, (T, S) and (T, P)."""

    spatial: torch.Tensor  # slot per spatial entry
    tpos: torch.Tensor  # row of maskmem_tpos_enc per spatial entry
    spatial_valid: torch.Tensor
    pointer: torch.Tensor  # slot per pointer entry
    distance: torch.Tensor  # row of the pointer temporal-encoding table
    pointer_valid: torch.Tensor
    read: frozenset[int]  # anchor frames whose spatial memory some tracked frame reads


def index_tables(cfg: VirstConfig, anchors: list[int], num_frames: int,
                 device: torch.device) -> FrameIndex:
    """SAM2's memory selection of every frame as slot indices into the bank's buffers."""
    k, r, q = len(anchors), cfg.num_maskmem - 1, cfg.max_obj_ptrs - 1
    slot_of = {a: i for i, a in enumerate(anchors)}
    s_max, p_max = cfg.max_memory_frames, cfg.max_pointer_frames
    rows = {name: torch.zeros(num_frames, n, dtype=torch.long) for name, n in
            (("spatial", s_max), ("tpos", s_max), ("pointer", p_max), ("distance", p_max))}
    s_valid = torch.zeros(num_frames, s_max)
    p_valid = torch.zeros(num_frames, p_max)
    read = set()
    for t in range(num_frames):
        if t in slot_of:
            continue  # anchors are predicted, not tracked
        plan = select_memory(t, anchors, num_frames, num_maskmem=cfg.num_maskmem,
                             max_anchors=cfg.max_anchors_in_attn, max_obj_ptrs=cfg.max_obj_ptrs)
        read.update(f for _, f in plan.spatial if f in slot_of)
        spatial = [(slot_of[a], 0) for a in plan.anchors]
        spatial += [(k + f % r, t_pos) for t_pos, f in plan.previous]
        for i, (slot, t_pos) in enumerate(spatial):
            rows["spatial"][t, i], rows["tpos"][t, i] = slot, cfg.num_maskmem - t_pos - 1
        s_valid[t, : len(spatial)] = 1
        for i, (dist, f) in enumerate(plan.pointers):
            rows["pointer"][t, i] = slot_of[f] if f in plan.anchors else k + f % q
            rows["distance"][t, i] = dist
        p_valid[t, : len(plan.pointers)] = 1
    return FrameIndex(rows["spatial"].to(device), rows["tpos"].to(device), s_valid.to(device),
                      rows["pointer"].to(device), rows["distance"].to(device),
                      p_valid.to(device), frozenset(read))


def pointer_encodings(constants: dict, cfg: VirstConfig, num_frames: int,
                      device: torch.device) -> torch.Tensor:
    """(num_frames, Cm): SAM2's signed temporal encoding of an object pointer `d` frames
    back, normalised by min(num_frames, max_obj_ptrs) - 1, through `obj_ptr_tpos_proj`."""
    t_max = max(1, min(num_frames, cfg.max_obj_ptrs) - 1)
    dist = torch.arange(num_frames, dtype=torch.float32, device=device) / t_max
    w = constants["obj_ptr_tpos_proj.weight"].to(device, torch.float32)
    b = constants["obj_ptr_tpos_proj.bias"].to(device, torch.float32)
    return torch.nn.functional.linear(get_1d_sine_pe(dist, dim=cfg.sam_dim), w, b)


class MemoryBank:
    def __init__(self, cfg: VirstConfig, constants: dict, anchors: list[int], num_frames: int,
                 objects: int, device: torch.device, dtype: torch.dtype = torch.float32):
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
        self.pointer_pos = pointer_encodings(constants, cfg, num_frames, device).to(dtype)
        self.index = index_tables(cfg, self.anchors, num_frames, device)

    @property
    def anchors_read(self) -> frozenset[int]:
        """Anchor frames whose spatial memory a tracked frame reads; only these need it."""
        return self.index.read

    def _store(self, frame: int, slot: int, ptr_slot: int, out: StepOutput) -> None:
        self.pointers[:, ptr_slot] = out.ptr
        if out.maskmem is None:  # only an anchor nobody reads may come without memory
            if frame in self.index.read or frame not in self.anchor_slot:
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

    def inputs(self, frame: int) -> TrackInputs:
        ix = self.index
        b = self.spatial.shape[0]
        return TrackInputs(
            memory=self.spatial[:, ix.spatial[frame]].to(self.dtype),
            memory_tpos=self.tpos[ix.tpos[frame]].expand(b, -1, -1),
            memory_valid=ix.spatial_valid[frame].to(self.dtype).expand(b, -1),
            pointers=self.pointers[:, ix.pointer[frame]],
            pointer_pos=self.pointer_pos[ix.distance[frame]].expand(b, -1, -1),
            pointer_valid=ix.pointer_valid[frame].to(self.dtype).expand(b, -1))
