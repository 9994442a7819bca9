"""Boundary-F scorer speed: `virst.eval.metrics.boundary_f` (OpenCV dilation, one kernel per
size) against a straightforward per-frame SciPy implementation of the same definition, on
the same masks. Prints medians and the ratio; checks the values agree.

    python benchmarks/scorer.py [--frames 40] [--height 480] [--width 854]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
from scipy import ndimage

from virst.data.render import shape_mask
from virst.eval.metrics import boundary_f, seg2bmap


def boundary_f_scipy(gt: np.ndarray, pred: np.ndarray, bound_th: float = 0.008) -> float:
    """The DAVIS definition, written plainly: SciPy binary dilation with a fresh disk."""
    radius = math.ceil(bound_th * math.hypot(*gt.shape))
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = x * x + y * y <= radius * radius
    gb, pb = seg2bmap(gt), seg2bmap(pred)
    if not gb.any() or not pb.any():
        return 1.0 if gb.any() == pb.any() else 0.0
    g_dil = ndimage.binary_dilation(gb, structure=disk)
    p_dil = ndimage.binary_dilation(pb, structure=disk)
    precision = (pb & g_dil).sum() / pb.sum()
    recall = (gb & p_dil).sum() / gb.sum()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def masks(frames: int, h: int, w: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    gt = np.zeros((frames, h, w), bool)
    pred = np.zeros_like(gt)
    for t in range(frames):
        cx, cy, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.05, 0.2) * h
        gt[t] = shape_mask("star", cx, cy, r, h, w)
        pred[t] = shape_mask("circle", cx + rng.normal(0, 4), cy + rng.normal(0, 4), r, h, w)
    return gt, pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=854)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    gt, pred = masks(args.frames, args.height, args.width)
    timings = {"opencv": [], "scipy": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        fast = boundary_f(gt, pred)
        timings["opencv"].append((time.perf_counter() - start) / args.frames)
        start = time.perf_counter()
        slow = np.array([boundary_f_scipy(g, p) for g, p in zip(gt, pred)])
        timings["scipy"].append((time.perf_counter() - start) / args.frames)
    assert np.allclose(fast, slow), "the two implementations disagree"
    ours, ref = (statistics.median(timings[k]) * 1e3 for k in ("opencv", "scipy"))
    print(f"boundary F on {args.frames} frames of {args.height}x{args.width} "
          f"(median of {args.repeats}), values equal: max |diff| "
          f"{np.abs(fast - slow).max():.1e}")
    print(f"{'implementation':<28}{'ms / frame':>12}")
    print(f"{'virst (OpenCV dilation)':<28}{ours:12.2f}")
    print(f"{'SciPy binary_dilation':<28}{ref:12.2f}")
    print(f"speed-up: {ref / ours:.1f}x")


if __name__ == "__main__":
    main()
