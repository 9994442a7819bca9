"""Which frames the VLM and the segmentation stage see (DESIGN.md section 1, item 1).

The release draws a random frame inside each of N_vlm equal segments and a random T_seg
subset; this toolkit is deterministic by default: segment centres and evenly spaced
T_seg frames. `seed` gives the release's random scheme, reproducibly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from virst.config import VirstConfig
from virst.tdau import anchor_indices


def vlm_frame_count(length: int, cfg: VirstConfig) -> int:
    """N_vlm = min(64, L) // 4 * 4 for L > 8; 8 otherwise (short videos repeat the last frame)."""
    if length > cfg.min_vlm_frames:
        return min(cfg.max_vlm_frames, length) // cfg.clip_frames * cfg.clip_frames
    return cfg.min_vlm_frames


def vlm_frames(length: int, cfg: VirstConfig, rng: np.random.Generator | None = None) -> list[int]:
    """Video frame index of each VLM frame."""
    n = vlm_frame_count(length, cfg)
    if length <= n:
        return list(range(length)) + [length - 1] * (n - length)
    edges = np.linspace(0, length, num=n + 1, dtype=int)  # the release's segment edges
    if rng is None:
        return [int(a + b) // 2 for a, b in zip(edges[:-1], edges[1:])]
    return [int(rng.integers(a, b)) for a, b in zip(edges[:-1], edges[1:])]


def seg_positions(n_vlm: int, cfg: VirstConfig,
                  rng: np.random.Generator | None = None) -> list[int]:
    """Positions (into the VLM frames) of the T_seg = min(32, N_vlm) segmentation frames."""
    t = min(cfg.max_seg_frames, n_vlm)
    if rng is None:
        return [i * n_vlm // t for i in range(t)]
    return sorted(rng.choice(n_vlm, size=t, replace=False).tolist())


@dataclass(frozen=True)
class FramePlan:
    """Everything frame selection decides for one video of `length` frames."""

    length: int
    vlm: tuple[int, ...]  # video frame per VLM frame
    seg: tuple[int, ...]  # video frame per segmentation frame
    anchor_positions: tuple[int, ...]  # positions into `seg`

    @property
    def anchor_frames(self) -> dict[int, int]:
        """Video frame -> segmentation position; a repeated frame keeps its last anchor."""
        return {self.seg[p]: p for p in self.anchor_positions}


def plan_frames(length: int, cfg: VirstConfig, seed: int | None = None) -> FramePlan:
    if length < 1:
        raise ValueError("a video needs at least one frame")
    rng = None if seed is None else np.random.default_rng(seed)
    vlm = vlm_frames(length, cfg, rng)
    seg = [vlm[p] for p in seg_positions(len(vlm), cfg, rng)]
    anchors = anchor_indices(len(seg), cfg.frames_per_anchor)
    return FramePlan(length, tuple(vlm), tuple(seg), tuple(anchors))
