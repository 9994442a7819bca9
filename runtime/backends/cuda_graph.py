"""A unit replayed as a CUDA graph per input shape: one launch for its hundreds of small
kernels.

The track step runs once per frame on B objects, and it is hundreds of small kernels (measured on
an H200, virst-7b bf16: the propagation stage's timer read 25 ms a frame eager, uncaptured,
and 0.9 ms compiled and replayed as a graph). Not Inductor's "reduce-overhead"
mode: its graph trees are kept per Python thread, and the runtime calls units from pool
threads and a server from whichever thread serves a request; a captured graph replays from
any thread. Its memory is compact (real entries only), so a video's frames take a few
input shapes (virst-7b's selection: 17 to 21 over 100 to 1000 frames, most frames in 3 or
4 of them): a graph each, all in one memory pool (they replay one at a time)."""

from __future__ import annotations

import threading
import warnings

import torch

# units whose kernels are many and small, called once per frame
GRAPHED_UNITS = ("track_step",)


def signature(args) -> tuple:
    """Shapes and dtypes of a unit's arguments (None for an argument left out)."""
    return tuple(None if a is None else (tuple(a.shape), a.dtype) for a in args)


class CudaGraphed:
    """`fn` captured as a CUDA graph once per input signature, then replayed: inputs are
    copied into the graph's own buffers and the outputs cloned out, under a lock (one
    graph's buffers serve one call at a time). An argument may be None (passed as it is).
    If `fn` cannot be captured, `fallback` (the same unit another way: the compiled
    backend's eager unit) is captured in its place; failing that too, the unit runs
    uncaptured. Each failure is a warning that says why, and `state()` tells."""

    def __init__(self, fn, fallback=None):
        self.fn, self.fallback = fn, fallback
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list, list]] = {}
        self.failed: str | None = None  # why `fn` (and the fallback) could not be captured
        self.fell_back: str | None = None  # why `fn` could not, when the fallback could
        self._lock = threading.Lock()
        self._pool = None  # the graphs' shared memory pool, made at the first capture

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        if self.failed:
            return self.fn(*args)
        key = signature(args)
        with self._lock:
            if key not in self.graphs and not self._captured(key, args):
                return self.fn(*args)
            graph, inputs, outputs = self.graphs[key]
            for buffer, a in zip(inputs, args):
                if a is not None:
                    buffer.copy_(a)
            graph.replay()
            return [o.clone() for o in outputs]

    def _captured(self, key: tuple, args) -> bool:
        """Capture `fn` for these inputs. If it cannot be, the fallback becomes `fn` (the
        graphs captured so far stay) and is captured; failing that, False from now on."""
        try:
            self.graphs[key] = self._capture(args)
            return True
        except RuntimeError as err:
            why = f"{type(err).__name__}: {err}".splitlines()[0]
        if self.fallback is None:
            self.failed = why
            warnings.warn(f"CUDA graph capture failed, running uncaptured: {why}", stacklevel=3)
            return False
        warnings.warn(f"CUDA graph capture failed ({why}); capturing the fallback", stacklevel=3)
        self.fn, self.fallback, self.fell_back = self.fallback, None, why
        return self._captured(key, args)

    def state(self) -> str:
        """What happened to the unit, for a run's description."""
        why = f"; the unit itself could not be ({self.fell_back})" if self.fell_back else ""
        if self.failed:
            return f"not captured as a CUDA graph ({self.failed}){why}"
        if self.graphs:
            source = " of its fallback" if self.fell_back else ""
            return f"replayed as CUDA graphs{source} ({len(self.graphs)} input shape(s)){why}"
        return "not called yet (captured as a CUDA graph at its first call)"

    def _capture(self, args) -> tuple[torch.cuda.CUDAGraph, list, list]:
        inputs = [None if a is None else a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compilation, autotuning) outside the capture
            for _ in range(2):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        # "thread_local": the runtime's other threads go on using the GPU during a capture
        # (the image encoder, pinned copies, a unit compiling); under the default "global"
        # mode any such call on any thread invalidates the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = self.fn(*inputs)
        return graph, inputs, outputs
