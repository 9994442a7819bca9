"""RoPE3D as a Triton kernel: keys rotate their t, y, x lanes by their grid cell, queries
only their t lanes by their frame; interleaved (GPT-J) pairs; angles and rotation in fp32,
rounded to the input dtype once. Positions come from the token index, no index tensors.

Reference: `virst.stf.RoPE3D` (same lane layout; `rope3d_reference` below calls it).
The `lane_tables`, `angles` and `rotate` pieces are shared with `virst_kernels.stf_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from virst.stf import RoPE3D

_TABLES: dict = {}


def lane_tables(head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per lane: which axis rotates it (0 t, 1 y, 2 x, 3 none) and its inverse frequency,
    taken from the reference module so both paths use bit-identical frequencies."""
    key = (head_dim, str(device))
    if key not in _TABLES:
        rope = RoPE3D(head_dim, grid_hw=1)
        lanes = rope.axis_lanes
        axis = torch.full((head_dim,), 3, dtype=torch.int32)
        inv = torch.zeros(head_dim, dtype=torch.float32)
        for a in range(3):
            axis[a * lanes : (a + 1) * lanes] = a
            inv[a * lanes : (a + 1) * lanes] = rope.inv_freq
        _TABLES[key] = (axis.to(device), inv.to(device))
    return _TABLES[key]


@triton.jit
def angles(t, y, x, lane_axis, lane_inv):
    """(BLOCK, D) fp32 angles for tokens at (t, y, x); pass y = x = -1 for queries' t-only."""
    pos = tl.where(lane_axis[None, :] == 0, t[:, None],
                   tl.where(lane_axis[None, :] == 1, y[:, None],
                            tl.where(lane_axis[None, :] == 2, x[:, None], 0)))
    pos = tl.where(pos < 0, 0, pos)
    return pos.to(tl.float32) * lane_inv[None, :]


@triton.jit
def rotate(x, x_partner, ang, offs_d):
    """x * cos + rotate_pairs(x) * sin, with x_partner[d] = x[d ^ 1] (fp32)."""
    sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    return x * tl.cos(ang) + sign[None, :] * x_partner * tl.sin(ang)


@triton.jit
def _rope3d_kernel(X, OUT, LANE_AXIS, LANE_INV, S, T, G,
                   stride_r, stride_s, IS_KEY: tl.constexpr, D: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(1)
    offs_s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    valid = offs_s[:, None] < S
    base = X + row * stride_r + offs_s[:, None] * stride_s
    x = tl.load(base + offs_d[None, :], mask=valid, other=0.0).to(tl.float32)
    xp = tl.load(base + (offs_d ^ 1)[None, :], mask=valid, other=0.0).to(tl.float32)
    lane_axis = tl.load(LANE_AXIS + offs_d)
    lane_inv = tl.load(LANE_INV + offs_d)
    if IS_KEY:
        ang = angles(offs_s // (G * G), (offs_s // G) % G, offs_s % G, lane_axis, lane_inv)
    else:
        none = tl.full([BLOCK], -1, tl.int32)
        ang = angles(offs_s % T, none, none, lane_axis, lane_inv)
    out = rotate(x, xp, ang, offs_d)
    dst = OUT + row * stride_r + offs_s[:, None] * stride_s + offs_d[None, :]
    tl.store(dst, out.to(OUT.dtype.element_ty), mask=valid)


def rope3d(x: torch.Tensor, frames: int, grid_hw: int, kind: str, block: int = 64) -> torch.Tensor:
    """Rotate (..., S, D) keys (`kind="key"`, S = frames * grid^2 in (t, y, x) order) or
    queries (`kind="query"`, S = tokens * frames, query i at frame i % frames)."""
    if kind not in ("key", "query"):
        raise ValueError(f"kind must be 'key' or 'query', got {kind!r}")
    *lead, s, d = x.shape
    if kind == "key" and s != frames * grid_hw * grid_hw:
        raise ValueError(f"keys: {s} tokens != {frames} frames x {grid_hw}^2 cells")
    if kind == "query" and s % frames:
        raise ValueError(f"queries: {s} tokens are not a multiple of {frames} frames")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head dim must be a power of two >= 16, got {d}")
    x3 = x.reshape(-1, s, d).contiguous()
    out = torch.empty_like(x3)
    axis, inv = lane_tables(d, x.device)
    grid = (triton.cdiv(s, block), x3.shape[0])
    _rope3d_kernel[grid](x3, out, axis, inv, s, frames, grid_hw, x3.stride(0), x3.stride(1),
                         IS_KEY=kind == "key", D=d, BLOCK=block)
    return out.view(x.shape)


def rope3d_reference(x: torch.Tensor, frames: int, grid_hw: int, kind: str) -> torch.Tensor:
    rope = RoPE3D(x.shape[-1], grid_hw).to(x.device)
    s = x.shape[-2]
    ang = (rope.key_angles(frames, x.device) if kind == "key"
           else rope.query_angles(s // frames, frames, x.device))
    return RoPE3D.rotate(x, ang)
