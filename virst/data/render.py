"""Procedural video rendering: textured backgrounds and coloured shapes moving on paths.

Objects are drawn back to front; each object's mask is its visible pixels (what a later
object covers is not part of it), so occlusion is exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (235, 215, 40), "orange": (245, 140, 30), "purple": (140, 60, 190),
    "pink": (240, 120, 190), "cyan": (40, 200, 210), "white": (245, 245, 245),
}
KINDS = ("circle", "square", "triangle", "diamond", "star", "ring")


@dataclass
class Shape:
    kind: str
    color: str
    radius: float  # half the extent, in pixels
    xy: np.ndarray  # (T, 2) centre per frame (x, y), may lie outside the frame
    depth: int = 0  # larger is drawn later (in front)


def _unit_mask(kind: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Shape test in coordinates normalised by the radius."""
    if kind == "circle":
        return dx * dx + dy * dy <= 1
    if kind == "ring":
        d = dx * dx + dy * dy
        return (d <= 1) & (d >= 0.3)
    if kind == "square":
        return (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1
    if kind == "triangle":
        return (dy <= 0.8) & (dy >= 2 * np.abs(dx) - 1.2)
    if kind == "star":
        ang = np.arctan2(dy, dx)
        return np.sqrt(dx * dx + dy * dy) <= 0.55 + 0.45 * np.abs(np.cos(2.5 * ang)) ** 3
    raise ValueError(f"unknown shape kind {kind!r}")


def shape_mask(kind: str, cx: float, cy: float, r: float, h: int, w: int) -> np.ndarray:
    """Boolean (h, w) mask of one shape centred at (cx, cy) with half-extent r."""
    mask = np.zeros((h, w), bool)
    y0, y1 = max(0, int(cy - r) - 1), min(h, int(cy + r) + 2)
    x0, x1 = max(0, int(cx - r) - 1), min(w, int(cx + r) + 2)
    if y0 >= y1 or x0 >= x1:
        return mask
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    mask[y0:y1, x0:x1] = _unit_mask(kind, (x + 0.5 - cx) / r, (y + 0.5 - cy) / r)
    return mask


def background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random texture (sum of a few low-frequency waves) plus fine noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 160, size=3).astype(np.float32)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    for _ in range(4):
        fx, fy = rng.uniform(0.5, 4, size=2) * 2 * np.pi / np.array([w, h])
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(5, 25, size=3).astype(np.float32)
        img += np.sin(fx * x + fy * y + phase)[..., None] * amp
    img += rng.normal(0, 4, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255)


def render(shapes: list[Shape], h: int, w: int, frames: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T, h, w, 3) uint8 and visible masks (len(shapes), T, h, w) bool."""
    bg = background(h, w, rng)
    video = np.empty((frames, h, w, 3), np.uint8)
    masks = np.zeros((len(shapes), frames, h, w), bool)
    order = sorted(range(len(shapes)), key=lambda i: shapes[i].depth)
    shading = {i: rng.uniform(-12, 12, size=3) for i in range(len(shapes))}
    for t in range(frames):
        img = bg.copy()
        for i in order:
            s = shapes[i]
            m = shape_mask(s.kind, s.xy[t, 0], s.xy[t, 1], s.radius, h, w)
            img[m] = np.clip(np.array(COLORS[s.color]) + shading[i], 0, 255)
            masks[:, t][:, m] = False  # whatever is behind is covered here
            masks[i, t] = m
        video[t] = img.astype(np.uint8)
    return video, masks
