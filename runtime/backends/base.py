"""What every backend provides: the SAM2 steps, the vision tower and the SegPrompter, each
as one call on batched tensors. The memory bank, the frame loop and the language model
stay in Python and are the same for every backend (runtime/session.py).

A backend runs the units `export/units.py` defines, from the model's own modules (torch
eager or compiled) or from the exported artifacts (ONNX Runtime, TensorRT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from virst.config import VirstConfig


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
        return Features(self.level2[idx], self.high_res0[idx], self.high_res1[idx])

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
    maskmem: torch.Tensor  # (B, Cm, h, w) the frame's spatial memory

    def take(self, idx) -> StepOutput:
        return StepOutput(*(x[idx] for x in self.as_tuple()))

    def as_tuple(self):
        return self.logits, self.ious, self.score, self.ptr, self.maskmem


@dataclass
class TrackInputs:
    """The fixed-shape memory of `TrackStep` for B objects (runtime/memory.py builds it)."""

    memory: torch.Tensor  # (B, S, h*w, Cm)
    memory_tpos: torch.Tensor  # (B, S, Cm)
    memory_valid: torch.Tensor  # (B, S) float 0/1
    pointers: torch.Tensor  # (B, P, C)
    pointer_pos: torch.Tensor  # (B, P, Cm)
    pointer_valid: torch.Tensor  # (B, P)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.__dict__)


class Backend(Protocol):
    name: str
    device: torch.device
    config: VirstConfig
    constants: dict[str, torch.Tensor]  # maskmem_tpos_enc, obj_ptr_tpos_proj.{weight,bias}

    def encode(self, pixels: torch.Tensor) -> Features: ...

    def anchor(self, feats: Features, prompt: torch.Tensor) -> StepOutput: ...

    def track(self, feats: Features, memory: TrackInputs) -> StepOutput: ...

    def vision(self, clips: torch.Tensor) -> torch.Tensor: ...

    def seg_prompter(self, seg_hidden: torch.Tensor, seg_features: torch.Tensor) -> torch.Tensor:
        ...

    def describe(self) -> str: ...
