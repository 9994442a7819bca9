"""A `Session` per video: one pass for any number of expressions.

    pass 1   the sampled frames only, each converted and encoded on the compute threads as
             it is decoded -> UMT video tokens, SAM2 features of the T_seg segmentation
             frames (both cached for every later request on this video)
    prompts  the LM's text + video prefix once, the expressions' suffixes as one batch on
             its cache, the SegPrompter per expression (side by side on the compute
             threads) -> a prompt per frame
    anchors  every anchor of every expression, in batched steps side by side on the compute
             threads; the memory encoder only where a tracked frame will read the memory
    pass 2   frames decoded (background thread) and encoded (compute threads) ahead of
             the sequential memory loop (on a GPU from before the prompts and anchors
             are made: it has work meanwhile), the objects of all expressions as the batch;
             masks upsampled in batches and handed out frame by frame

Memory does not grow with the video's length or resolution: the bank has fixed-size
buffers, frames pass through bounded queues in both passes, masks leave as soon as they are
known.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import closing, nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from runtime.backends.base import Features, StepOutput
from runtime.heap import KEPT_BLOCK, release_freed_memory
from runtime.memory import MemoryBank
from runtime.threads import Background, Tasks, Timers, bounded
from runtime.video import VideoSource, open_video
from runtime.writer import FrameMasks
from virst.preprocess import to_model_input
from virst.prompt import Prompt
from virst.sampling import plan_frames

UPSAMPLE_BATCH = 8  # frames whose masks are upsampled together
# float pixels upsampled per call: the float32 intermediate fills half the largest block
# the heap keeps (runtime/heap.py) and is reused, instead of mapped and faulted in per batch
# (8 frames x 4 objects at 768x576 were 57 MB: 7.7 s of a 795-frame run against 1.0 for one)
UPSAMPLE_PIXELS = KEPT_BLOCK // 8
IN_FLIGHT = 2  # frames (pass 2: batches) handed to each compute thread ahead of its work
ANCHOR_BATCH = 32  # anchor prompts (frames x expressions) decoded in one call


class Session:
    def __init__(self, runtime, video, seed: int | None = None, allow_truncated: bool = False):
        self.rt = runtime
        self.source: VideoSource = open_video(video, allow_truncated)
        self.source.decode_threads = runtime.decode_threads
        self.plan = plan_frames(self.source.length, runtime.config, seed)
        self.timers = Timers()
        self._seg_position = {f: p for p, f in enumerate(self.plan.seg)}
        self._video_tokens: torch.Tensor | None = None
        self._seg: Features | None = None
        self.cache_hits = 0
        self.on_sampled = None  # called as pass 1 decodes each sampled frame (progress)

    @property
    def sampled_frames(self) -> int:
        """Frames pass 1 keeps; spread over the video, so they measure its progress."""
        return len(set(self.plan.vlm) | set(self.plan.seg))

    @property
    def length(self) -> int:
        return self.source.length

    # -------------------------------------------------------------- cached pass 1
    def _first_pass(self) -> bool:
        """The sampled frames -> video tokens and segmentation-frame features. Each frame
        is converted (VLM pixels) and encoded (SAM2 features) on the compute threads as
        soon as it is decoded and then dropped: at most IN_FLIGHT frames per thread are
        held, whatever the video's resolution (held whole, the 64 sampled frames of a
        100-frame 4K video made a 2.9 GB peak; now 1.3). The vision tower runs here
        while the last frames are encoded. True when the results were cached already."""
        if self._seg is not None:
            return True
        rt, plan = self.rt, self.plan
        vlm, seg = set(plan.vlm), sorted(set(plan.seg))
        pixels, parts, batch = {}, [], []
        with Tasks(rt.pool) as pool:
            submit = bounded(pool, IN_FLIGHT * rt.compute_workers)
            for t, frame in self._timed(self.source.sampled(vlm | set(seg)), "decode"):
                if self.on_sampled is not None:
                    self.on_sampled()
                if t in vlm:
                    pixels[t] = submit(self._vlm_pixels, frame)
                if t in self._seg_position:
                    batch.append(frame)
                if len(batch) == rt.encode_batch:
                    parts.append(submit(self._encode, batch))
                    batch = []
            if batch:
                parts.append(submit(self._encode, batch))
            self._video_tokens = self._vision([pixels[f].result() for f in plan.vlm])
            parts = [p.result() for p in parts]
        feats = Features.cat(parts) if len(parts) > 1 else parts[0]
        row = {f: i for i, f in enumerate(seg)}
        self._seg = feats.take([row[f] for f in plan.seg])
        return False

    def _vlm_pixels(self, frame: np.ndarray) -> torch.Tensor:
        cfg = self.rt.config
        with self.timers("vlm"), torch.inference_mode():
            return to_model_input(np.stack([frame]), cfg.vlm_image_size, cfg.vlm_resize,
                                  self.rt.device, self.rt.dtype)

    def _encode(self, frames: list[np.ndarray]) -> Features:
        with self.timers("image encoder"), torch.inference_mode():
            return self.rt.encode(frames)

    def _vision(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        clip = self.rt.config.clip_frames
        with self.timers("vlm"), torch.inference_mode():
            clips = torch.cat(pixels)
            return self.rt.backend.vision(clips.view(-1, clip, *clips.shape[1:]))

    def video_tokens(self) -> torch.Tensor:
        self._first_pass()
        return self._video_tokens

    def seg_features(self) -> Features:
        self._first_pass()
        return self._seg

    # ------------------------------------------------------------------ prompts
    def prompts(self, expressions: list[str]) -> torch.Tensor:
        """(E, N, T_seg, C): each expression's prompt tokens for every segmentation frame."""
        return self._prompts(self._checked_and_sampled(expressions))

    def _checked_and_sampled(self, expressions: list[str]) -> list[Prompt]:
        """The expressions' prompts (refused before any work), pass 1 done or reused."""
        prompts = [self.rt.build_prompt(e) for e in expressions]
        self.cache_hits += self._first_pass()
        return prompts

    @torch.inference_mode()
    def _prompts(self, prompts: list[Prompt]) -> torch.Tensor:
        rt = self.rt
        seg = self.seg_features().level2[None]  # (1, T, C, h, w)
        with self.timers("vlm"):
            hidden = rt.lm.seg_hidden(prompts, self.video_tokens(), seg)

        def stf(e: int) -> torch.Tensor:
            with self.timers("stf"), torch.inference_mode():
                return rt.backend.seg_prompter(hidden[e : e + 1].to(rt.dtype), seg)

        with Tasks(rt.pool) as pool:  # expressions side by side
            return torch.cat(pool.map(stf, range(len(prompts))))

    def _anchors(self, prompts: torch.Tensor, remember: frozenset[int]
                 ) -> dict[int, StepOutput]:
        """Every anchor of every expression in batched steps of at most ANCHOR_BATCH
        prompts (64 anchors x 4 expressions in one call: peak RSS 1971 MB against 1035 in
        steps of 32, shapes clip, ONNX Runtime), the steps on the compute threads side by
        side: frame -> (E, ...). Only anchors in `remember` get a spatial memory."""
        per_call = max(1, ANCHOR_BATCH // prompts.shape[0])
        frames = sorted(self.plan.anchor_frames)
        chunks = [frames[i : i + per_call] for i in range(0, len(frames), per_call)]
        with Tasks(self.rt.pool) as pool:
            parts = pool.map(lambda c: self._anchor_chunk(prompts, c, remember), chunks)
            return {f: out for part in parts for f, out in part.items()}

    def _anchor_chunk(self, prompts: torch.Tensor, frames: list[int],
                      remember: frozenset[int]) -> dict[int, StepOutput]:
        e, backend = prompts.shape[0], self.rt.backend
        positions = [self.plan.anchor_frames[f] for f in frames]
        feats = Features.cat([self._seg.take([p]).repeat(e) for p in positions])
        tokens = torch.cat([prompts[:, :, p] for p in positions])  # (k * E, P, C)
        with self.timers("anchors"), torch.inference_mode():
            step = backend.anchor(feats, tokens)
            kept = [i for i, f in enumerate(frames) if f in remember]
            rows = [i * e + j for i in kept for j in range(e)]
            memory = backend.memory(feats.take(rows), step.take(rows)) if rows else None
        out = {f: step.take(slice(i * e, (i + 1) * e)) for i, f in enumerate(frames)}
        for n, i in enumerate(kept):
            out[frames[i]] = out[frames[i]].with_memory(memory[n * e : (n + 1) * e])
        return out

    # ------------------------------------------------------------------- pass 2
    def _encoded(self, keep_frames: bool) -> Iterator[tuple[int, np.ndarray | None, Features]]:
        """Every frame in order with its features: segmentation frames from the cache,
        the others encoded `encode_batch` at a time on the compute threads, IN_FLIGHT
        batches per thread ahead (on one thread, resizing and encoding large frames held
        the frame loop back). With one core, all of it on this thread."""
        rt = self.rt
        workers = rt.compute_workers if rt.threads.encoder_thread else 0
        limit = IN_FLIGHT * max(1, workers)
        ahead: deque = deque()  # (frames in order, Future of their batch's features | None)
        pending, batch = [], []
        with Tasks(rt.pool) if workers else nullcontext() as pool:
            submit = bounded(pool, limit)
            for t, frame in self._timed(self.source.frames(), "decode"):
                pending.append((t, frame))
                if t not in self._seg_position:
                    batch.append(frame)
                # cached frames with nothing to encode before them go on at once: a clip
                # whose every frame is cached (at most 64) was otherwise held whole
                if len(batch) == rt.encode_batch or not batch:
                    ahead.append((pending, submit(self._encode, batch) if batch else None))
                    pending, batch = [], []
                yield from self._hand_on(ahead, keep_frames, wait=len(ahead) > limit)
            if batch:
                ahead.append((pending, submit(self._encode, batch)))
            while ahead:
                yield from self._hand_on(ahead, keep_frames, wait=True)

    def _hand_on(self, ahead: deque, keep_frames: bool, wait: bool) -> Iterator:
        """The frames of the oldest batches whose features are ready, in order; with
        `wait`, the oldest's first."""
        while ahead and (wait or ahead[0][1] is None or ahead[0][1].done()):
            frames, future = ahead.popleft()
            feats, row, wait = future.result() if future is not None else None, 0, False
            for t, frame in frames:
                cached = self._seg_position.get(t)
                if cached is None:
                    one, row = feats.take([row]), row + 1
                else:
                    one = self._seg.take([cached])
                yield t, frame if keep_frames else None, one

    def _timed(self, items: Iterator, stage: str) -> Iterator:
        items = iter(items)
        while True:
            with self.timers(stage):
                item = next(items, None)
            if item is None:
                return
            yield item

    def segment(self, expressions: list[str], keep_frames: bool = False
                ) -> Iterator[FrameMasks]:
        """Masks of every expression for every frame, in order, as soon as they are known."""
        try:
            yield from self._propagate(expressions, keep_frames)
        finally:
            release_freed_memory()  # what the run kept for reuse goes back (runtime/heap.py)

    def _propagate(self, expressions: list[str], keep_frames: bool) -> Iterator[FrameMasks]:
        prompts = self._checked_and_sampled(expressions)
        # on a GPU pass 2 decodes and encodes ahead while the language model and the
        # anchors run (an H200's trace of virst-7b: the GPU nearly idle for 0.2 s of a 2.3 s
        # run there); on a CPU it starts after them (the cores are theirs: 1.00x the time,
        # and its frames in flight would add to the anchors' peak memory)
        early = self._pass_2(keep_frames) if self.rt.pass_2_early else None
        with closing(early) if early is not None else nullcontext():
            yield from self._frame_loop(self._prompts(prompts), keep_frames, early)

    def _pass_2(self, keep_frames: bool) -> Iterator:
        stream = self._encoded(keep_frames)
        if self.rt.threads.encoder_thread:  # bounded: IN_FLIGHT batches per compute thread
            stream = Background(stream, maxsize=2, name="virst-encoder")
        return stream

    def _frame_loop(self, prompts: torch.Tensor, keep_frames: bool,
                    stream: Iterator | None) -> Iterator[FrameMasks]:
        rt, e = self.rt, prompts.shape[0]
        bank = MemoryBank(rt.config, rt.backend.constants, sorted(self.plan.anchor_frames),
                          self.length, e, rt.device, rt.dtype)
        anchors = self._anchors(prompts, bank.anchors_read)
        for frame, out in anchors.items():
            bank.write_anchor(frame, out)
        stream = stream if stream is not None else self._pass_2(keep_frames)
        with closing(stream):
            yield from self._tracked(anchors, bank, e, stream)

    def _tracked(self, anchors: dict, bank: MemoryBank, e: int, stream: Iterator
                 ) -> Iterator[FrameMasks]:
        rt = self.rt
        done, pending = [], None
        with torch.inference_mode():
            for t, frame, feats in stream:
                with self.timers("propagation"):
                    out = anchors.get(t)
                    if out is None:
                        out = rt.backend.track(feats.repeat(e),
                                               bank.inputs(t, rt.backend.compact_memory))
                    bank.write_frame(t, out)
                done.append((t, frame, out.logits, out.score))
                if len(done) == UPSAMPLE_BATCH:
                    # the batch before is handed out once this one is queued: a GPU has
                    # work while the host waits for those masks
                    yield from pending or ()
                    pending, done = self._masks(done), []
            yield from pending or ()
            yield from self._masks(done)

    def _masks(self, done: list) -> Iterator[FrameMasks]:
        """Low-res logits of several frames upsampled to the video size together, copied
        to the host without waiting; the frames are handed out when iterated."""
        if not done:
            return iter(())
        with self.timers("mask upsampling"):
            logits = torch.cat([d[2] for d in done])  # (n * E, 1, h, w)
            masks = upsample_masks(logits, self.source.size).reshape(
                len(done), -1, *self.source.size)
            scores = torch.cat([d[3] for d in done]).float().sigmoid().view(len(done), -1)
            return self._handed_out(done, HostCopy(masks, scores))

    def _handed_out(self, done: list, copied: HostCopy) -> Iterator[FrameMasks]:
        masks, scores = copied.arrays()
        for (t, frame, _, _), m, s in zip(done, masks, scores):
            yield FrameMasks(t, self.source.names[t], m, s, frame)


class HostCopy:
    """Device tensors copied to pinned host memory without blocking the calling thread
    (on a GPU; a CPU's tensors are kept as they are); `arrays()` waits for the copy.
    Blocking copies of the masks held the frame loop for 0.78 s of a 5.3 s run (H200)."""

    def __init__(self, *tensors: torch.Tensor):
        self.event = None
        if tensors[0].device.type != "cuda":
            self.host = tensors
            return
        self.host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
            t, non_blocking=True) for t in tensors)
        self.event = torch.cuda.Event()
        self.event.record()

    def arrays(self) -> list[np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return [t.numpy() for t in self.host]


def upsample_masks(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) mask logits -> (B, H, W) bool masks (bilinear, > 0) on their device, at
    most UPSAMPLE_PIXELS float pixels per interpolation call."""
    masks = torch.empty((logits.shape[0], *size), dtype=torch.bool, device=logits.device)
    step = max(1, UPSAMPLE_PIXELS // (size[0] * size[1]))
    for i in range(0, logits.shape[0], step):
        up = F.interpolate(logits[i : i + step].float(), size=size, mode="bilinear",
                           align_corners=False)
        torch.gt(up[:, 0], 0, out=masks[i : i + step])
    return masks
