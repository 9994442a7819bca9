"""torch compiled: the eager backend's units through `torch.compile` (Inductor: fused C++
on a CPU, Triton on a GPU). Shapes are fixed per session (the encoder batch is padded by
the session, the track step is padded to the memory bounds), so each unit compiles once.
On a GPU the track step, the per-frame unit of small kernels, also replays as one CUDA
graph per input shape (`CudaGraphed`). Not Inductor's "reduce-overhead" mode: its graph
trees are kept per Python thread, and the runtime calls units from pool threads (the
encoder ahead of the frame loop) and a server from whichever thread serves a request."""

from __future__ import annotations

import threading
import warnings

import torch
from torch._dynamo.utils import counters

from runtime.backends.eager import EagerBackend
from virst.model import VirstModel

GRAPHED_UNITS = ("track_step",)


class CudaGraphed:
    """`fn` captured as a CUDA graph once per input signature, then replayed: inputs are
    copied into the graph's own buffers and the outputs cloned out, under a lock (one
    graph's buffers serve one call at a time). A unit that cannot be captured runs as it
    is, with a warning that says why."""

    def __init__(self, fn):
        self.fn = fn
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list, list]] = {}
        self.failed: str | None = None
        self._lock = threading.Lock()

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        if self.failed:
            return self.fn(*args)
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        with self._lock:
            if key not in self.graphs:
                try:
                    self.graphs[key] = self._capture(args)
                except RuntimeError as err:
                    self.failed = f"{type(err).__name__}: {err}".splitlines()[0]
                    warnings.warn(f"CUDA graph capture failed, running uncaptured: "
                                  f"{self.failed}", stacklevel=2)
                    return self.fn(*args)
            graph, inputs, outputs = self.graphs[key]
            for buffer, a in zip(inputs, args):
                buffer.copy_(a)
            graph.replay()
            return [o.clone() for o in outputs]

    def _capture(self, args) -> tuple[torch.cuda.CUDAGraph, list, list]:
        inputs = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compilation, autotuning) outside the capture
            for _ in range(2):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(*inputs)
        return graph, inputs, outputs


class CompiledBackend(EagerBackend):
    name = "compiled"

    def __init__(self, model: VirstModel, device: torch.device):
        super().__init__(model, device)
        self.units = {name: torch.compile(unit, dynamic=False)
                      for name, unit in self.units.items()}
        self._settled: set[tuple] = set()  # (unit, input shapes) whose last call compiled nothing
        self._compiling = threading.Lock()
        self.graphed = {name: CudaGraphed(lambda *a, n=name: EagerBackend._run(self, n, *a))
                        for name in GRAPHED_UNITS} if device.type == "cuda" else {}

    def _run(self, name: str, *args):
        if name in self.graphed:
            return self.graphed[name](*args)
        key = (name, *((tuple(a.shape), a.dtype) for a in args))
        if key in self._settled:
            return super()._run(name, *args)
        # Dynamo cannot trace one unit on two threads at once (SAM2's position encoding
        # fills a dict while it is traced: "Guard failed on the same frame it was
        # created"), and a shape may compile twice (the filled dict is guarded anew):
        # new shapes run one call at a time until a call compiles nothing
        with self._compiling:
            compiled_frames = counters["frames"]["total"]
            out = super()._run(name, *args)
            if counters["frames"]["total"] == compiled_frames:
                self._settled.add(key)
        return out

    def describe(self) -> str:
        graphs = ""
        if self.graphed:
            failed = [f"{n} ({g.failed})" for n, g in self.graphed.items() if g.failed]
            graphs = (f"; CUDA graphs not captured: {', '.join(failed)}" if failed
                      else f"; {', '.join(self.graphed)} replayed as CUDA graphs")
        return f"torch {torch.__version__} compiled (inductor) on {self.device}{graphs}"
