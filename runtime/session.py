"""A `Session` per video: one pass for any number of expressions.

    pass 1   the sampled frames only -> UMT video tokens, SAM2 features of the T_seg
             segmentation frames (both cached for every later request on this video)
    prompts  the LM's text + video prefix once, the expressions' suffixes as one batch on
             its cache, the SegPrompter per expression (side by side on the compute
             threads) -> a prompt per frame
    anchors  every anchor of every expression, in batched steps side by side on the compute
             threads; the memory encoder only where a tracked frame will read the memory
    pass 2   frames decoded and encoded in batches ahead (background thread) of the
             sequential memory loop, the objects of all expressions as the batch; masks
             upsampled in batches and handed out frame by frame

Memory does not grow with the video: the bank has fixed-size buffers, frames pass through
a bounded queue, masks leave as soon as they are known.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from runtime.backends.base import Features, StepOutput
from runtime.heap import KEPT_BLOCK, release_freed_memory
from runtime.memory import MemoryBank
from runtime.threads import Timers, background
from runtime.video import VideoSource, open_video
from runtime.writer import FrameMasks
from virst.preprocess import to_model_input
from virst.sampling import plan_frames

UPSAMPLE_BATCH = 8  # frames whose masks are upsampled together
# float pixels upsampled per call: the float32 intermediate fills half the largest block
# the heap keeps (runtime/heap.py) and is reused, instead of mapped and faulted in per batch
# (8 frames x 4 objects at 768x576 were 57 MB: 7.7 s of a 795-frame run against 1.0 for one)
UPSAMPLE_PIXELS = KEPT_BLOCK // 8
ENCODE_CHUNKS_PER_WORKER = 4  # segmentation-frame chunks per compute thread in pass 1
ANCHOR_BATCH = 32  # anchor prompts (frames x expressions) decoded in one call


class Session:
    def __init__(self, runtime, video, seed: int | None = None, allow_truncated: bool = False):
        self.rt = runtime
        self.source: VideoSource = open_video(video, allow_truncated)
        self.source.decode_threads = 1
        self.plan = plan_frames(self.source.length, runtime.config, seed)
        self.timers = Timers()
        self._seg_position = {f: p for p, f in enumerate(self.plan.seg)}
        self._video_tokens: torch.Tensor | None = None
        self._seg: Features | None = None
        self.cache_hits = 0

    @property
    def length(self) -> int:
        return self.source.length

    # -------------------------------------------------------------- cached pass 1
    def _first_pass(self) -> bool:
        """The sampled frames -> video tokens and segmentation-frame features, the vision
        tower and chunks of the image encoder side by side on the compute threads. True
        when they were cached already."""
        if self._seg is not None:
            return True
        rt, cfg, plan = self.rt, self.rt.config, self.plan
        with self.timers("decode"):
            frames = self.source.read(set(plan.vlm) | set(plan.seg))

        def vision():
            with self.timers("vlm"), torch.inference_mode():
                step = cfg.clip_frames  # one clip at a time: full-size float copies of all
                pixels = torch.cat([  # 64 frames would be the run's memory peak
                    to_model_input(np.stack([frames[f] for f in plan.vlm[i : i + step]]),
                                   cfg.vlm_image_size, cfg.vlm_resize, rt.device, rt.dtype)
                    for i in range(0, len(plan.vlm), step)])
                return rt.backend.vision(pixels.view(-1, step, *pixels.shape[1:]))

        def encode(chunk):
            with self.timers("image encoder"), torch.inference_mode():
                return rt.encode([frames[f] for f in chunk])

        seg = sorted(set(plan.seg))
        # several chunks per thread: the thread that ran the vision tower takes fewer
        workers = rt.compute_workers
        pieces = workers * ENCODE_CHUNKS_PER_WORKER if workers > 1 else 1
        chunks = [c for c in np.array_split(seg, pieces) if len(c)]
        with ThreadPoolExecutor(2 if rt.threads.encoder_thread else 1) as pool:
            tokens = pool.submit(vision)
            parts = list(pool.map(encode, chunks))
        self._video_tokens = tokens.result()
        feats = Features.cat(parts) if len(parts) > 1 else parts[0]
        row = {f: i for i, f in enumerate(seg)}
        self._seg = feats.take([row[f] for f in plan.seg])
        return False

    def video_tokens(self) -> torch.Tensor:
        self._first_pass()
        return self._video_tokens

    def seg_features(self) -> Features:
        self._first_pass()
        return self._seg

    # ------------------------------------------------------------------ prompts
    @torch.inference_mode()
    def prompts(self, expressions: list[str]) -> torch.Tensor:
        """(E, N, T_seg, C): each expression's prompt tokens for every segmentation frame."""
        rt = self.rt
        prompts = [rt.build_prompt(e) for e in expressions]
        self.cache_hits += self._first_pass()
        seg = self.seg_features().level2[None]  # (1, T, C, h, w)
        with self.timers("vlm"):
            hidden = rt.lm.seg_hidden(prompts, self.video_tokens(), seg)

        def stf(e: int) -> torch.Tensor:
            with self.timers("stf"), torch.inference_mode():
                return rt.backend.seg_prompter(hidden[e : e + 1].to(rt.dtype), seg)

        with ThreadPoolExecutor(rt.compute_workers) as pool:  # expressions side by side
            return torch.cat(list(pool.map(stf, range(len(expressions)))))

    def _anchors(self, prompts: torch.Tensor, remember: frozenset[int]
                 ) -> dict[int, StepOutput]:
        """Every anchor of every expression in batched steps of at most ANCHOR_BATCH
        prompts (64 anchors x 4 expressions in one call: peak RSS 1971 MB against 1035 in
        steps of 32, shapes clip, ONNX Runtime), the steps on the compute threads side by
        side: frame -> (E, ...). Only anchors in `remember` get a spatial memory."""
        per_call = max(1, ANCHOR_BATCH // prompts.shape[0])
        frames = sorted(self.plan.anchor_frames)
        chunks = [frames[i : i + per_call] for i in range(0, len(frames), per_call)]
        with ThreadPoolExecutor(self.rt.compute_workers) as pool:
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
        the others encoded `encode_batch` at a time."""
        pending, batch = [], []

        def flush():
            feats = None
            if batch:
                with self.timers("image encoder"):
                    feats = self.rt.encode([f for _, f in batch])
            row = {t: i for i, (t, _) in enumerate(batch)}
            for t, frame in pending:
                cached = self._seg_position.get(t)
                one = self._seg.take([cached]) if cached is not None else feats.take([row[t]])
                yield t, frame if keep_frames else None, one
            pending.clear()
            batch.clear()

        for t, frame in self._timed(self.source.frames(), "decode"):
            pending.append((t, frame))
            if t not in self._seg_position:
                batch.append((t, frame))
            if len(batch) == self.rt.encode_batch:
                yield from flush()
        yield from flush()

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
        rt = self.rt
        prompts = self.prompts(expressions)
        e = len(expressions)
        bank = MemoryBank(rt.config, rt.backend.constants, sorted(self.plan.anchor_frames),
                          self.length, e, rt.device, rt.dtype)
        anchors = self._anchors(prompts, bank.anchors_read)
        for frame, out in anchors.items():
            bank.write_anchor(frame, out)
        stream = self._encoded(keep_frames)
        if rt.threads.encoder_thread:
            stream = background(stream, maxsize=2, name="virst-encoder")
        done = []
        with torch.inference_mode():
            for t, frame, feats in stream:
                with self.timers("propagation"):
                    out = anchors.get(t)
                    if out is None:
                        out = rt.backend.track(feats.repeat(e), bank.inputs(t))
                    bank.write_frame(t, out)
                done.append((t, frame, out.logits, out.score))
                if len(done) == UPSAMPLE_BATCH:
                    yield from self._masks(done)
                    done = []
            yield from self._masks(done)

    def _masks(self, done: list) -> Iterator[FrameMasks]:
        """Low-res logits of several frames upsampled to the video size together."""
        if not done:
            return
        with self.timers("mask upsampling"):
            logits = torch.cat([d[2] for d in done])  # (n * E, 1, h, w)
            masks = upsample_masks(logits, self.source.size).reshape(
                len(done), -1, *self.source.size)
            scores = torch.cat([d[3] for d in done]).float().sigmoid().view(len(done), -1)
            scores = scores.cpu().numpy()
        for i, (t, frame, _, _) in enumerate(done):
            yield FrameMasks(t, self.source.names[t], masks[i], scores[i], frame)


def upsample_masks(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(B, 1, h, w) mask logits -> (B, H, W) bool masks (bilinear, > 0), at most
    UPSAMPLE_PIXELS float pixels per interpolation call."""
    masks = torch.empty((logits.shape[0], *size), dtype=torch.bool, device=logits.device)
    step = max(1, UPSAMPLE_PIXELS // (size[0] * size[1]))
    for i in range(0, logits.shape[0], step):
        up = F.interpolate(logits[i : i + step].float(), size=size, mode="bilinear",
                           align_corners=False)
        torch.gt(up[:, 0], 0, out=masks[i : i + step])
    return masks.cpu().numpy()
