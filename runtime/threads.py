"""Threads on purpose: how many compute threads a run uses, and a background stage.

On a few shared cores torch's default intra-op threading oversubscribes them (the same run
swung between 0.6 and 3.6 FPS on 2 cores, one thread gave 22-24 FPS). So the runtime
splits the cores it is given between pipeline stages itself:

    1 core      everything in the calling thread, one compute thread
    2+ cores    a background thread decodes ahead of the frame loop (the calling thread:
                the memory loop); batches that do not depend on each other (the image
                encoder's frames, anchors) run on both compute threads on a CPU; the two
                compute threads share the cores as intra-op threads (1 each on 2-3 cores);
                a writer thread encodes and writes the masks (PNG, RLE, overlay) the frame
                loop hands it. It is not a compute thread: PNG and H.264 encoding run in C
                outside the GIL, in bursts, and no thread pool spins while it waits (what
                made torch's default threading swing), so the compute threads still get
                the cores (2 cores, bikes.mp4, 64 frames, 4 expressions, ONNX Runtime:
                1.18 s with it, 1.41 s without)
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadPlan:
    cores: int
    intra_op: int  # torch / ONNX Runtime threads per compute thread
    encoder_thread: bool  # decoding (and the image encoder, on the compute threads) ahead
    # of the frame loop
    writer_thread: bool  # masks encoded and written beside the frame loop

    @classmethod
    def for_cores(cls, cores: int | None = None) -> ThreadPlan:
        cores = max(1, cores or available_cores())
        return cls(cores, max(1, cores // 2), cores > 1, cores > 1)

    def apply(self) -> None:
        torch.set_num_threads(self.intra_op)

    def describe(self) -> str:
        parts = (["frame loop"] + (["decode"] if self.encoder_thread else [])
                 + (["mask writer"] if self.writer_thread else []))
        return (f"{self.cores} cores: threads {', '.join(parts)}; "
                f"{self.intra_op} intra-op thread(s) each")


class Timers:
    """Seconds spent per stage, summed over threads (stages overlap in time). Each stage is
    also a profiler range: `benchmarks/fps.py --profile` counts the kernels launched inside
    a range against it, where on a GPU these wall-clock timers see launches and waits."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(f"stage: {stage}"):
                yield
        finally:
            with self._lock:
                self.seconds[stage] += time.perf_counter() - start

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds


class Tasks:
    """Tasks on the runtime's long-lived compute pool, waited for on leaving the block (as
    `with ThreadPoolExecutor()` waits for its own; tasks not yet started are cancelled
    when the block ends early). The pool's threads outlive each video, and with them
    what a thread caches: cuDNN keeps its attention plans per thread, and building one
    took 61-73 ms on an H200 (28 of them, 1.8 s, in each virst-7b eager run when every
    call made its own threads)."""

    def __init__(self, pool: Executor):
        self.pool, self.futures = pool, []

    def submit(self, fn, *args) -> Future:
        """From one thread at a time (each block's producer). Finished tasks are let go:
        a future holds its result, and pass 2 submits a task per frame (1024 frames at
        768x576 kept 1.9 GB of features until the video's end)."""
        self.futures = [f for f in self.futures if not f.done()]
        future = self.pool.submit(fn, *args)
        self.futures.append(future)
        return future

    def map(self, fn, items) -> list:
        return [f.result() for f in [self.submit(fn, item) for item in items]]

    def __enter__(self) -> Tasks:
        return self

    def __exit__(self, *exc) -> None:
        for future in self.futures:
            future.cancel()
        wait(self.futures)


def bounded(pool: Executor | Tasks | None, limit: int):
    """`pool.submit` that first waits for the oldest of `limit` pending tasks: a producer
    faster than the pool (a decoder) holds at most `limit` tasks' arguments (frames).
    `pool=None`: each task runs at once on the calling thread."""
    pending: deque[Future] = deque()

    def submit(fn, *args) -> Future:
        if pool is None:
            future = Future()
            future.set_result(fn(*args))
            return future
        while len(pending) >= limit:
            pending.popleft().result()
        future = pool.submit(fn, *args)
        pending.append(future)
        return future

    return submit


_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Handoff:
    """A bounded queue from a producer thread to a consumer that may leave: once `stop()`
    is called, `put` gives up (returns False) instead of blocking forever on a full queue."""

    def __init__(self, maxsize: int):
        self.queue: queue.Queue = queue.Queue(maxsize)
        self.stopped = threading.Event()

    def put(self, item) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def stop(self) -> None:
        self.stopped.set()


class Background(Iterator):
    """Run the iterator `items` in a thread from now on, `maxsize` results ahead of the
    consumer (started before its first result is asked for, it works while the consumer
    does something else). An exception there is raised here; `close()` (or leaving a
    `with` block) stops the thread, closing `items` there."""

    def __init__(self, items: Iterator, maxsize: int = 2, name: str = "virst-stage"):
        self._handoff = Handoff(maxsize)
        self._ended = False
        self._thread = threading.Thread(target=self._produce, args=(items,), name=name,
                                        daemon=True)
        self._thread.start()

    def _produce(self, items: Iterator) -> None:
        try:
            with torch.inference_mode():
                for item in items:
                    if not self._handoff.put(item):
                        return
            self._handoff.put(_END)
        except BaseException as err:  # handed to the consumer, which raises it
            self._handoff.put(_Failure(err))
        finally:
            getattr(items, "close", lambda: None)()  # a generator's clean-up, on its thread

    def __next__(self):
        if self._ended:
            raise StopIteration
        item = self._handoff.queue.get()
        if item is _END or isinstance(item, _Failure):
            self.close()
        if item is _END:
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item

    def close(self) -> None:
        self._ended = True
        self._handoff.stop()
        self._thread.join()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
