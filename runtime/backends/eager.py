"""torch eager: the export units run on the model's own modules (the reference code, with
SAM2's RoPE and LayerNorm2d in their equal real forms)."""

from __future__ import annotations

import torch

from export.units import AnchorStep, ImageEncoder, SegPrompterUnit, TrackStep, VisionUnit
from runtime.backends.base import Features, StepOutput, TrackInputs
from virst.model import VirstModel


def model_constants(model: VirstModel) -> dict[str, torch.Tensor]:
    sam = model.sam2
    return {"maskmem_tpos_enc": sam.maskmem_tpos_enc.detach(),
            "obj_ptr_tpos_proj.weight": sam.obj_ptr_tpos_proj.weight.detach(),
            "obj_ptr_tpos_proj.bias": sam.obj_ptr_tpos_proj.bias.detach()}


class EagerBackend:
    name = "eager"

    def __init__(self, model: VirstModel, device: torch.device):
        self.model = model.to(device).eval()
        self.config, self.device = model.config, device
        self.constants = model_constants(model)
        self.units = {"image_encoder": ImageEncoder(model), "anchor_step": AnchorStep(model),
                      "track_step": TrackStep(model), "seg_prompter": SegPrompterUnit(model),
                      "vision": VisionUnit(model)}
        for unit in self.units.values():
            unit.to(device).eval().requires_grad_(False)

    def _run(self, name: str, *args):
        with torch.inference_mode():
            return self.units[name](*args)

    def encode(self, pixels: torch.Tensor) -> Features:
        return Features(*self._run("image_encoder", pixels))

    def anchor(self, feats: Features, prompt: torch.Tensor) -> StepOutput:
        return StepOutput(*self._run("anchor_step", *feats.as_tuple(), prompt))

    def track(self, feats: Features, memory: TrackInputs) -> StepOutput:
        m = memory
        return StepOutput(*self._run("track_step", *feats.as_tuple(), m.memory, m.memory_tpos,
                                     m.memory_valid, m.pointers, m.pointer_pos,
                                     m.pointer_valid))

    def vision(self, clips: torch.Tensor) -> torch.Tensor:
        return self._run("vision", clips)

    def seg_prompter(self, seg_hidden: torch.Tensor, seg_features: torch.Tensor) -> torch.Tensor:
        return self._run("seg_prompter", seg_hidden, seg_features)

    def describe(self) -> str:
        return f"torch {torch.__version__} eager on {self.device}"
