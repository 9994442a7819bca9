"""RVOS metrics, written from the published protocol (DESIGN.md section 5).

J: IoU of one frame, 1 when prediction and ground truth are both empty.
F: boundary F-measure. Boundaries are 1-px maps in the DAVIS `seg2bmap` convention (each
   pixel that differs from its east, south or south-east neighbour; last row and column
   compared along themselves only), matched within a disk of radius
   ceil(0.008 * sqrt(H^2 + W^2)); both boundaries empty -> 1, exactly one empty -> 0.
A, R (ReVOS): pixel accuracy, and robustness 1 - false positives / all annotated object
   pixels (clipped at 0), both on 0/1 masks.
Any non-zero pixel is foreground; void pixels (optional) are left out of J and F.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np

BOUNDARY_TOLERANCE = 0.008


def _frames(x: np.ndarray) -> np.ndarray:
    """(H, W) or (T, H, W), any dtype -> (T, H, W) bool."""
    x = np.asarray(x)
    if x.ndim not in (2, 3):
        raise ValueError(f"masks must be (H, W) or (T, H, W), got shape {x.shape}")
    return (x != 0).reshape((-1, *x.shape[-2:]))


def _pair(gt, pred, void=None):
    g, p = _frames(gt), _frames(pred)
    if g.shape != p.shape:
        raise ValueError(f"ground truth {g.shape} and prediction {p.shape} differ in shape")
    v = np.zeros_like(g) if void is None else _frames(void)
    if v.shape != g.shape:
        raise ValueError(f"void mask {v.shape} does not match the masks {g.shape}")
    return g, p, v


def _per_frame(values: np.ndarray, like) -> np.ndarray | float:
    return float(values[0]) if np.asarray(like).ndim == 2 else values


def region_similarity(gt, pred, void=None):
    """J per frame (float for one frame, array for (T, H, W))."""
    g, p, v = _pair(gt, pred, void)
    keep = ~v
    inter = (g & p & keep).sum(axis=(1, 2))
    union = ((g | p) & keep).sum(axis=(1, 2))
    j = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return _per_frame(j, gt)


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """1-px boundary map (H, W) bool, DAVIS convention (offset half a pixel to the origin)."""
    seg = np.asarray(mask, dtype=bool)
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    b[-1, :] = seg[-1, :] ^ east[-1, :]
    b[:, -1] = seg[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    return b


def tolerance_radius(height: int, width: int) -> int:
    return int(math.ceil(BOUNDARY_TOLERANCE * math.hypot(height, width)))


@lru_cache(maxsize=32)
def disk(radius: int) -> np.ndarray:
    """Structuring element: pixels with x^2 + y^2 <= r^2 (as skimage.morphology.disk)."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (x * x + y * y <= radius * radius).astype(np.uint8)


def _boundary_f(gt: np.ndarray, pred: np.ndarray, kernel: np.ndarray) -> float:
    gb, pb = seg2bmap(gt), seg2bmap(pred)
    n_gt, n_pred = int(gb.sum()), int(pb.sum())
    if n_gt == 0 or n_pred == 0:
        return 1.0 if n_gt == n_pred else 0.0
    g_dil = cv2.dilate(gb.view(np.uint8), kernel).view(bool)
    p_dil = cv2.dilate(pb.view(np.uint8), kernel).view(bool)
    precision = (pb & g_dil).sum() / n_pred
    recall = (gb & p_dil).sum() / n_gt
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def boundary_f(gt, pred, void=None):
    """F per frame (float for one frame, array for (T, H, W))."""
    g, p, v = _pair(gt, pred, void)
    kernel = disk(tolerance_radius(*g.shape[1:]))
    keep = ~v
    f = np.array([_boundary_f(gi & k, pi & k, kernel) for gi, pi, k in zip(g, p, keep)])
    return _per_frame(f, gt)


def sequence_jf(gt, pred, void=None) -> tuple[float, float, float]:
    """(J, F, J&F) of one expression: means over all its frames."""
    j = float(np.mean(region_similarity(gt, pred, void)))
    f = float(np.mean(boundary_f(gt, pred, void)))
    return j, f, (j + f) / 2


def revos_accuracy(gt, pred):
    """Pixel accuracy per frame on 0/1 masks."""
    g, p, _ = _pair(gt, pred)
    return _per_frame((g == p).mean(axis=(1, 2)), gt)


def revos_robustness(gt, pred, foreground):
    """max(0, 1 - false-positive pixels / pixels of all annotated objects), per frame."""
    g, p, _ = _pair(gt, pred)
    fg = _frames(foreground)
    if fg.shape != g.shape:
        raise ValueError(f"foreground {fg.shape} does not match the masks {g.shape}")
    neg = (p & ~g).sum(axis=(1, 2))
    pos = fg.sum(axis=(1, 2))
    return _per_frame(np.maximum(1 - neg / (pos + 1e-6), 0.0), gt)
