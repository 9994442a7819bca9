"""torch eager: the export units run on the model's own modules (the reference code, with
SAM2's RoPE and LayerNorm2d in their equal real forms). On a GPU the track step replays as
a CUDA graph (runtime/backends/cuda_graph.py): the same kernels, launched once."""

from __future__ import annotations

import torch

from export.units import (
    ImageEncoder,
    MaskDecoder,
    MemoryEncoder,
    SegPrompterUnit,
    TrackStep,
    VisionUnit,
)
from runtime.backends.base import Backend
from runtime.backends.cuda_graph import GRAPHED_UNITS, CudaGraphed
from virst.model import VirstModel, low_precision


def model_constants(model: VirstModel) -> dict[str, torch.Tensor]:
    sam = model.sam2
    return {"maskmem_tpos_enc": sam.maskmem_tpos_enc.detach(),
            "obj_ptr_tpos_proj.weight": sam.obj_ptr_tpos_proj.weight.detach(),
            "obj_ptr_tpos_proj.bias": sam.obj_ptr_tpos_proj.bias.detach()}


class EagerBackend(Backend):
    name = "eager"
    compact_memory = True

    def __init__(self, model: VirstModel, device: torch.device):
        self.model = model.to(device).eval()  # (SAM2's position caches emptied: sam2_model.py)
        self.config, self.device = model.config, device
        self.constants = model_constants(model)
        self.units = {"image_encoder": ImageEncoder(model),
                      "mask_decoder_anchor": MaskDecoder(model, anchor=True),
                      "memory_encoder": MemoryEncoder(model),
                      "track_step": TrackStep(model), "seg_prompter": SegPrompterUnit(model),
                      "vision": VisionUnit(model)}
        for unit in self.units.values():
            unit.to(device).eval().requires_grad_(False)
        self.graphed = {name: CudaGraphed(lambda *a, n=name: self._call(n, *a),
                                          fallback=self._fallback(name))
                        for name in GRAPHED_UNITS} if device.type == "cuda" else {}

    def _fallback(self, name: str):
        """What to capture if the unit cannot be (the compiled backend: its eager unit)."""
        return None

    def _run(self, name: str, *args) -> list[torch.Tensor]:
        if name in self.graphed:
            return self.graphed[name](*args)
        return self._call(name, *args)

    def _call(self, name: str, *args) -> list[torch.Tensor]:
        return self._invoke(self.units[name], *args)

    def _invoke(self, unit, *args) -> list[torch.Tensor]:
        with torch.inference_mode(), low_precision(self.model):
            out = unit(*args)
        return list(out) if isinstance(out, tuple) else [out]

    def _graphs_described(self) -> str:
        return "".join(f"; {name} {graph.state()}" for name, graph in self.graphed.items())

    def describe(self) -> str:
        return f"torch {torch.__version__} eager on {self.device}{self._graphs_described()}"
