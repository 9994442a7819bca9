"""torch compiled: the eager backend's units through `torch.compile` (Inductor: fused C++
on a CPU, Triton on a GPU). The image encoder's batch is padded to a fixed size; the sizes
that vary (objects per call, the track step's memory size, a short video's segmentation
frames) compile as dynamic sizes (`dynamic_dims`), so a warmed-up runtime serves other
videos and expression counts without compiling (sizes 0 and 1 still compile their own
graphs, once). 100 frames of the embedded model, 7 memory sizes: 9 compiled frames in all
the units, 14 with static sizes. On a GPU the track step replays as a CUDA graph, as in
the eager backend (its eager unit's, if the compiled one cannot be captured)."""

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
        # sizes marked dynamic where they vary (`dynamic_dims`); the image encoder's are fixed
        self.units = {name: torch.compile(unit, dynamic=False if name == "image_encoder" else None)
                      for name, unit in self.units.items()}
        self._settled: set[tuple] = set()  # (unit, input shapes) whose last call compiled nothing
        self._compiling = threading.Lock()

    def _call(self, name: str, *args):
        args = tuple(standard_layout(a) for a in args)
        key = (name, *signature(args))
        if key in self._settled:
            return super()._call(name, *args)
        # Dynamo cannot trace one unit on two threads at once (SAM2's position encoding
        # fills a dict while it is traced: "Guard failed on the same frame it was
        # created"), and a shape may compile twice (the filled dict is guarded anew):
        # new shapes run one call at a time until a call compiles nothing
        mark_dynamic(name, args)
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


def dynamic_dims(name: str, args) -> list[tuple[int, int]]:
    """(argument, dim) pairs whose size changes from call to call or video to video: the
    objects (expressions x frames) of the per-object units, the track step's memory size,
    the segmentation frames and clips of a video shorter than the model's sampling. With
    static sizes each new count compiled anew (embedded model on this CPU: a 90- and a
    150-frame video after a 100-frame one, 1 compiled frame each; 2 and 3 expressions, 2
    and 4), and Dynamo gives a unit up to eager after 8 recompilations."""
    if name in ("mask_decoder_anchor", "memory_encoder", "vision"):
        return [(i, 0) for i in range(len(args))]
    if name == "track_step":
        return [(i, 0) for i in range(len(args))] + [(i, 1) for i in TRACK_MEMORY_ARGS]
    if name == "seg_prompter":
        return [(1, 1)]  # seg_features (1, T_seg, C, h, w)
    return []  # image_encoder: its batch is padded to a fixed size


def standard_layout(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t`, or a copy of it with a fresh tensor's strides at offset 0 where it is a view
    (the memory bank hands out expanded and offset ones): compiled graphs guard on their
    inputs' strides and offsets, and a view recompiled the track step (embedded model on
    this CPU: a 90-frame video after a 100-frame one)."""
    if t is None or (t.storage_offset() == 0 and t.stride() == contiguous_strides(t.shape)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def mark_dynamic(name: str, args) -> None:
    """One compiled graph per unit for every size (sizes 0 and 1 are specialised by
    Dynamo anyway: one expression's calls compile their own)."""
    for i, dim in dynamic_dims(name, args):
        if args[i] is not None and args[i].shape[dim] > 1:
            torch._dynamo.maybe_mark_dynamic(args[i], dim)
