"""What every backend provides: the SAM2 steps, the vision tower and the SegPrompter, each
as one call on batched tensors. The memory bank, the frame loop and the language model
stay in Python and are the same for every backend (runtime/session.py).

A backend runs the units `export/units.py` defines, from the model's own modules (torch
eager or compiled) or from the exported artifacts (ONNX Runtime, TensorRT).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from virst.config import VirstConfig
from virst.preprocess import to_device

# the exported units a backend runs (`export/units.py` builds these and a few more)
RUNTIME_UNITS = ("image_encoder", "mask_decoder_anchor", "memory_encoder", "track_step",
                 "seg_prompter", "vision")


def device_rows(idx: list[int] | slice, device: torch.device) -> slice | torch.Tensor:
    """Rows to take without waiting for the device: a slice where they are consecutive,
    else an index tensor copied from pinned memory. Indexing a GPU tensor with a Python
    list copies the list from pageable memory, which waits for all queued work (per frame:
    the thread that feeds the frame loop waited 1.0 s of a 4.3 s virst-7b run, H200)."""
    if isinstance(idx, slice):
        return idx
    idx = list(idx)
    if idx and idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx))
    return to_device(torch.tensor(idx, dtype=torch.long), device)


@dataclass
class Features:
    """SAM2 image features of a batch of frames: level 2 (B, C, h, w) and the mask
    decoder's projected high-resolution maps (B, C/8, 4h, 4w), (B, C/4, 2h, 2w)."""

    level2: torch.Tensor
    high_res0: torch.Tensor
    high_res1: torch.Tensor

    def __len__(self) -> int:
        return self.level2.shape[0]

    def take(self, idx: list[int] | slice) -> Features:
        rows = device_rows(idx, self.level2.device)
        return Features(self.level2[rows], self.high_res0[rows], self.high_res1[rows])

    def repeat(self, n: int) -> Features:
        """Every frame n times in a row (frame-major): the objects of one frame."""
        return Features(*(x.repeat_interleave(n, dim=0) for x in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.level2, self.high_res0, self.high_res1

    def to(self, device) -> Features:
        return Features(*(x.to(device) for x in self.as_tuple()))

    @staticmethod
    def cat(parts: list[Features]) -> Features:
        return Features(*(torch.cat(xs) for xs in zip(*(p.as_tuple() for p in parts))))


@dataclass
class StepOutput:
    """One anchor or tracked step of B objects (or frames)."""

    logits: torch.Tensor  # (B, 1, 4h, 4w) low-res mask logits, no-object frames at -1024
    ious: torch.Tensor  # (B, 3) predicted IoU of the candidates
    score: torch.Tensor  # (B, 1) object score logit (<= 0: absent)
    ptr: torch.Tensor  # (B, C) object pointer
    maskmem: torch.Tensor | None  # (B, Cm, h, w) the frame's spatial memory; None on an
    # anchor that no tracked frame reads (its memory encoder is skipped)

    def take(self, idx: list[int] | slice) -> StepOutput:
        rows = device_rows(idx, self.logits.device)
        return StepOutput(*(None if x is None else x[rows] for x in self.as_tuple()))

    def with_memory(self, maskmem: torch.Tensor) -> StepOutput:
        return replace(self, maskmem=maskmem)

    def as_tuple(self):
        return self.logits, self.ious, self.score, self.ptr, self.maskmem


@dataclass
class TrackInputs:
    """The memory of `TrackStep` for B objects (runtime/memory.py builds it): padded to
    fixed bounds with validity masks, or compact (real entries only, masks None)."""

    memory: torch.Tensor  # (B, S, h*w, Cm)
    memory_tpos: torch.Tensor  # (B, S, Cm)
    memory_valid: torch.Tensor | None  # (B, S) float 0/1
    pointers: torch.Tensor  # (B, P, C)
    pointer_pos: torch.Tensor  # (B, P, Cm)
    pointer_valid: torch.Tensor | None  # (B, P)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.__dict__)


class Backend:
    """The protocol, written once over `_run(unit, *tensors) -> outputs`, the one method
    each backend implements (eager.py, compiled.py, ort.py, trt.py). A backend also has
    `name`, `device`, `config` and `constants` (maskmem_tpos_enc, obj_ptr_tpos_proj.*)."""

    name: str
    device: torch.device
    config: VirstConfig
    constants: dict[str, torch.Tensor]
    # the track step takes any memory size (compact memory, no masks): the torch backends;
    # artifacts have the padded fixed shapes
    compact_memory = False

    def _run(self, unit: str, *args: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def encode(self, pixels: torch.Tensor) -> Features:
        return Features(*self._run("image_encoder", pixels))

    def anchor(self, feats: Features, prompt: torch.Tensor) -> StepOutput:
        """Anchor masks from their prompt tokens, without memory (see `memory`)."""
        return StepOutput(*self._run("mask_decoder_anchor", *feats.as_tuple(), prompt), None)

    def memory(self, feats: Features, step: StepOutput) -> torch.Tensor:
        """The spatial memory of a step's chosen masks: (B, Cm, h, w)."""
        return self._run("memory_encoder", feats.level2, step.logits, step.score)[0]

    def track(self, feats: Features, memory: TrackInputs) -> StepOutput:
        m = memory
        return StepOutput(*self._run("track_step", *feats.as_tuple(), m.memory, m.memory_tpos,
                                     m.memory_valid, m.pointers, m.pointer_pos,
                                     m.pointer_valid))

    def vision(self, clips: torch.Tensor) -> torch.Tensor:
        return self._run("vision", clips)[0]

    def seg_prompter(self, seg_hidden: torch.Tensor, seg_features: torch.Tensor) -> torch.Tensor:
        return self._run("seg_prompter", seg_hidden, seg_features)[0]

    def describe(self) -> str:
        raise NotImplementedError
