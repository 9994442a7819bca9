"""torch compiled: the eager backend's units through `torch.compile` (Inductor: fused C++
on a CPU, Triton on a GPU). Shapes are fixed per session (the encoder batch is padded by
the session), so each unit but the track step compiles once; the track step's memory is
compact (its real entries only, a few sizes per video), so its memory and pointer counts
compile as dynamic sizes (100 frames of the embedded model, 7 memory sizes: 9 compiled
frames in all the units, 14 with static sizes). On a GPU the track step replays as a
CUDA graph, as in the eager backend."""

from __future__ import annotations

import threading

import torch
from torch._dynamo.utils import counters

from runtime.backends.cuda_graph import signature
from runtime.backends.eager import EagerBackend
from virst.model import VirstModel


class CompiledBackend(EagerBackend):
    name = "compiled"

    def __init__(self, model: VirstModel, device: torch.device):
        super().__init__(model, device)
        self.eager_units = dict(self.units)
        self.units = {name: torch.compile(unit, dynamic=None if name == "track_step" else False)
                      for name, unit in self.units.items()}
        self._settled: set[tuple] = set()  # (unit, input shapes) whose last call compiled nothing
        self._compiling = threading.Lock()

    def _call(self, name: str, *args):
        key = (name, *signature(args))
        if key in self._settled:
            return super()._call(name, *args)
        # Dynamo cannot trace one unit on two threads at once (SAM2's position encoding
        # fills a dict while it is traced: "Guard failed on the same frame it was
        # created"), and a shape may compile twice (the filled dict is guarded anew):
        # new shapes run one call at a time until a call compiles nothing
        if name == "track_step":
            mark_memory_dynamic(args)
        with self._compiling:
            compiled_frames = counters["frames"]["total"]
            out = super()._call(name, *args)
            if counters["frames"]["total"] == compiled_frames:
                self._settled.add(key)
        return out

    def _fallback(self, name: str):
        # on an H200 (5da2858) the compiled track step's capture failed ("operation failed
        # due to a previous error during capture") and it ran uncaptured, host-bound: 13 ms
        # a frame against 4.6 ms of kernels. The eager unit's graphs replayed there
        return lambda *args: self._invoke(self.eager_units[name], *args)

    def describe(self) -> str:
        return (f"torch {torch.__version__} compiled (inductor) on {self.device}"
                f"{self._graphs_described()}")


# TrackStep's arguments whose dim 1 is the memory's entry count: memory, memory_tpos,
# pointers, pointer_pos
TRACK_MEMORY_ARGS = (3, 4, 6, 7)


def mark_memory_dynamic(args) -> None:
    """One compiled track step for every memory size (sizes 0 and 1 are specialised by
    Dynamo anyway: a frame or two at a video's start compile their own)."""
    for i in TRACK_MEMORY_ARGS:
        if args[i].shape[1] > 1:
            torch._dynamo.mark_dynamic(args[i], 1)
