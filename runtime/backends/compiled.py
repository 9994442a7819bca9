"""torch compiled: the eager backend's units through `torch.compile` (Inductor: fused C++
on a CPU, Triton on a GPU). Shapes are fixed per session (the encoder batch is padded by
the session, the track step is padded to the memory bounds), so each unit compiles once;
on a GPU the fixed-shape units also replay as CUDA graphs ("reduce-overhead")."""

from __future__ import annotations

import torch

from runtime.backends.eager import EagerBackend
from virst.model import VirstModel


class CompiledBackend(EagerBackend):
    name = "compiled"

    def __init__(self, model: VirstModel, device: torch.device):
        super().__init__(model, device)
        mode = "reduce-overhead" if device.type == "cuda" else None
        self.units = {name: torch.compile(unit, dynamic=False, mode=mode)
                      for name, unit in self.units.items()}

    def _run(self, name: str, *args):
        out = super()._run(name, *args)
        if self.device.type == "cuda":  # CUDA-graph outputs are overwritten by the next replay
            out = [o.clone() for o in out]
        return out

    def describe(self) -> str:
        return f"torch {torch.__version__} compiled (inductor) on {self.device}"
