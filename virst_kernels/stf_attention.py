"""Fused STF cross-attention (SegPrompter): RoPE3D in the prologue, online softmax in fp32,
no materialised scores, optional per-frame attention mass in the same pass, and split-KV
(flash-decoding) so that a single block of queries still fills the GPU.

    stf_cross_attention(q, k, v, t_frames, grid_hw=8, key_padding_mask=None,
                        return_frame_score=False, split_kv=None)

q: (B, H, N*T, D) projected, NOT rotated, the T frames of each of the N tokens contiguous;
k, v: (B, H, g*g*T, D) in (t, y, x) order, k not rotated. Returns (B, H, N*T, D) (and the
frame score (B, T): attention mass per frame averaged over heads, queries and grid cells).
A query whose keys are all masked gets zeros (the reference gives NaN).

Reference: `virst.stf.RotaryCrossAttention.reference` (`stf_attention_reference` below).
Under TRITON_INTERPRET=1 the dots run in fp32 on inputs already rounded to the input dtype
(the interpreter's bf16 `tl.dot` is broken and its bf16 casts truncate).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from virst_kernels.rope3d import angles, lane_tables, rotate

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _round(x, dtype: tl.constexpr, BF16_BITS: tl.constexpr):
    """Round fp32 to `dtype` and back. The interpreter truncates bf16 casts, so there
    round-to-nearest-even is done on the bits."""
    if BF16_BITS:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(dtype).to(tl.float32)


@triton.jit
def _stf_attn_kernel(
    Q, K, V, MASK, OUT, ACC, ML, FS, SCORE, LANE_AXIS, LANE_INV,
    qk_scale, score_scale, S_q, S_k, T, G, H, blocks_per_split,
    s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_mb,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, T_PAD: tl.constexpr,
    HAS_MASK: tl.constexpr, FRAME_SCORE: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BF16_BITS: tl.constexpr,
):
    pid_m, pid_bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_splits = tl.num_programs(2)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    lane_axis = tl.load(LANE_AXIS + offs_d)
    lane_inv = tl.load(LANE_INV + offs_d)
    dtype = Q.dtype.element_ty

    # prologue: queries rotate their t lanes by their frame, pre-scaled for exp2
    q_rows = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qs
    q_ok = offs_m[:, None] < S_q
    q = tl.load(q_rows + offs_d[None, :], mask=q_ok, other=0.0).to(tl.float32)
    qp = tl.load(q_rows + (offs_d ^ 1)[None, :], mask=q_ok, other=0.0).to(tl.float32)
    none = tl.full([BLOCK_M], -1, tl.int32)
    q = rotate(q, qp, angles(offs_m % T, none, none, lane_axis, lane_inv), offs_d)
    q = _round(q, dtype, BF16_BITS) if UPCAST else q
    q = q * qk_scale  # scale after rounding: the reference rounds q before q.k / sqrt(D)
    if not UPCAST:
        q = q.to(dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    fs = tl.zeros([BLOCK_M, T_PAD], tl.float32)
    frame_ids = tl.arange(0, T_PAD)

    start = pid_s * blocks_per_split * BLOCK_N
    stop = tl.minimum(start + blocks_per_split * BLOCK_N, S_k)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < stop
        k_rows = K + b * s_kb + h * s_kh + offs_n[:, None] * s_ks
        k = tl.load(k_rows + offs_d[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
        kp = tl.load(k_rows + (offs_d ^ 1)[None, :], mask=n_ok[:, None], other=0.0)
        t_k = offs_n // (G * G)
        ang = angles(t_k, (offs_n // G) % G, offs_n % G, lane_axis, lane_inv)
        k = rotate(k, kp.to(tl.float32), ang, offs_d)
        k = _round(k, dtype, BF16_BITS) if UPCAST else k.to(dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        keep = n_ok
        if HAS_MASK:
            masked = tl.load(MASK + b * s_mb + offs_n, mask=n_ok, other=1)
            keep = keep & (masked == 0)
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vs + offs_d[None, :],
                    mask=n_ok[:, None], other=0.0)
        if UPCAST:
            pv = tl.dot(p, v.to(tl.float32))
        elif IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(dtype), v)
        acc = acc * alpha[:, None] + pv
        if FRAME_SCORE:
            onehot = (t_k[:, None] == frame_ids[None, :]).to(tl.float32)
            if IEEE:
                fs = fs * alpha[:, None] + tl.dot(p, onehot, input_precision="ieee")
            else:
                fs = fs * alpha[:, None] + tl.dot(p, onehot)
        m_i = m_new

    if SPLIT:  # partial results, combined by _combine_kernel
        row = (pid_bh * num_splits + pid_s) * S_q + offs_m
        tl.store(ACC + row[:, None] * D + offs_d[None, :], acc, mask=q_ok)
        tl.store(ML + row * 2, m_i, mask=offs_m < S_q)
        tl.store(ML + row * 2 + 1, l_i, mask=offs_m < S_q)
        if FRAME_SCORE:
            tl.store(FS + row[:, None] * T_PAD + frame_ids[None, :], fs, mask=q_ok)
    else:
        l_div = tl.where(l_i > 0, l_i, 1.0)
        out = tl.where(l_i[:, None] > 0, acc / l_div[:, None], 0.0)
        dst = OUT + b * s_qb + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :]
        tl.store(dst, out.to(OUT.dtype.element_ty), mask=q_ok)
        if FRAME_SCORE:
            mass = tl.where(q_ok, fs / l_div[:, None], 0.0)
            tl.atomic_add(SCORE + b * T_PAD + frame_ids, tl.sum(mass, axis=0) * score_scale)


@triton.jit
def _combine_kernel(ACC, ML, FS, OUT, SCORE, S_q, H, score_scale, s_ob, s_oh, s_os,
                    NUM_SPLITS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                    T_PAD: tl.constexpr, FRAME_SCORE: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    ok = offs_m < S_q
    m_tot = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(NUM_SPLITS):
        row = (pid_bh * NUM_SPLITS + s) * S_q + offs_m
        m_tot = tl.maximum(m_tot, tl.load(ML + row * 2, mask=ok, other=float("-inf")))
    m_safe = tl.where(m_tot == float("-inf"), 0.0, m_tot)
    l_tot = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    fs = tl.zeros([BLOCK_M, T_PAD], tl.float32)
    frame_ids = tl.arange(0, T_PAD)
    for s in range(NUM_SPLITS):
        row = (pid_bh * NUM_SPLITS + s) * S_q + offs_m
        w = tl.exp2(tl.load(ML + row * 2, mask=ok, other=float("-inf")) - m_safe)
        l_tot += w * tl.load(ML + row * 2 + 1, mask=ok, other=0.0)
        acc += w[:, None] * tl.load(ACC + row[:, None] * D + offs_d[None, :],
                                    mask=ok[:, None], other=0.0)
        if FRAME_SCORE:
            fs += w[:, None] * tl.load(FS + row[:, None] * T_PAD + frame_ids[None, :],
                                       mask=ok[:, None], other=0.0)
    l_div = tl.where(l_tot > 0, l_tot, 1.0)
    out = tl.where(l_tot[:, None] > 0, acc / l_div[:, None], 0.0)
    dst = OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_os + offs_d[None, :]
    tl.store(dst, out.to(OUT.dtype.element_ty), mask=ok[:, None])
    if FRAME_SCORE:
        mass = tl.where(ok[:, None], fs / l_div[:, None], 0.0)
        tl.atomic_add(SCORE + b * T_PAD + frame_ids, tl.sum(mass, axis=0) * score_scale)


def _check(q, k, v, t_frames, grid_hw, key_padding_mask):
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q (B, H, S_q, D) and k, v (B, H, S_k, D) expected, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    d = q.shape[-1]
    if d != k.shape[-1] or d & (d - 1) or d < 16:
        raise ValueError(f"head dim must be one power of two >= 16, got {d} and {k.shape[-1]}")
    if q.shape[2] % t_frames or k.shape[2] != t_frames * grid_hw * grid_hw:
        raise ValueError(f"S_q={q.shape[2]} must be N*T and S_k={k.shape[2]} must be "
                         f"{grid_hw}^2*T for T={t_frames}")
    if key_padding_mask is not None and key_padding_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must be (B, S_k) = {(k.shape[0], k.shape[2])}")


def stf_cross_attention(q, k, v, t_frames: int, *, grid_hw: int = 8, key_padding_mask=None,
                        return_frame_score: bool = False, split_kv: int | None = None,
                        block_m: int | None = None, block_n: int | None = None):
    _check(q, k, v, t_frames, grid_hw, key_padding_mask)
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    interp = _interpreting()
    block_m = block_m or (16 if interp else 64)
    block_n = block_n or (16 if interp else 64)
    n_kv = triton.cdiv(s_k, block_n)
    n_m = triton.cdiv(s_q, block_m)
    if split_kv is None:  # enough programs to fill the device, at least 2 KV blocks each
        sms = 1 if interp else torch.cuda.get_device_properties(q.device).multi_processor_count
        split_kv = max(1, min(n_kv // 2, triton.cdiv(2 * sms, n_m * b * h)))
    per_split = triton.cdiv(n_kv, split_kv)
    split_kv = triton.cdiv(n_kv, per_split)
    t_pad = max(16, triton.next_power_of_2(t_frames))
    axis, inv = lane_tables(d, q.device)
    upcast = interp and q.dtype != torch.float32
    # the interpreter's low-precision stores do not round: write fp32, cast in torch
    out = torch.empty_like(q, dtype=torch.float32 if upcast else q.dtype)
    score = torch.zeros(b, t_pad, device=q.device, dtype=torch.float32)
    mask = (key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None
            else torch.zeros(1, 1, dtype=torch.int8, device=q.device))
    split = split_kv > 1
    rows = b * h * split_kv * s_q if split else 1
    acc = torch.empty(rows, d, device=q.device, dtype=torch.float32)
    ml = torch.empty(rows, 2, device=q.device, dtype=torch.float32)
    fs = torch.empty(rows if return_frame_score else 1, t_pad, device=q.device,
                     dtype=torch.float32)
    score_scale = 1.0 / (h * s_q * grid_hw * grid_hw)
    ieee = q.dtype == torch.float32 and not interp
    _stf_attn_kernel[(n_m, b * h, split_kv)](
        q, k, v, mask, out, acc, ml, fs, score, axis, inv,
        LOG2E / math.sqrt(d), score_scale, s_q, s_k, t_frames, grid_hw, h, per_split,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], mask.stride(0),
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, T_PAD=t_pad,
        HAS_MASK=key_padding_mask is not None, FRAME_SCORE=return_frame_score, SPLIT=split,
        UPCAST=upcast, IEEE=ieee, BF16_BITS=upcast and q.dtype == torch.bfloat16,
    )
    if split:
        _combine_kernel[(n_m, b * h)](
            acc, ml, fs, out, score, s_q, h, score_scale, *out.stride()[:3],
            NUM_SPLITS=split_kv, D=d, BLOCK_M=block_m, T_PAD=t_pad,
            FRAME_SCORE=return_frame_score,
        )
    out = out.to(q.dtype)
    if return_frame_score:
        return out, score[:, :t_frames]
    return out


def stf_attention_reference(q, k, v, t_frames: int, *, grid_hw: int = 8,
                            key_padding_mask=None):
    """The reference module's math on the same inputs: (out, frame score)."""
    from virst.stf import RoPE3D

    rope = RoPE3D(q.shape[-1], grid_hw).to(q.device)
    qr = RoPE3D.rotate(q, rope.query_angles(q.shape[2] // t_frames, t_frames, q.device))
    kr = RoPE3D.rotate(k, rope.key_angles(t_frames, k.device))
    scores = qr.float() @ kr.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    b, h, s_q, s_k = probs.shape
    frame = probs.view(b, h, s_q, t_frames, s_k // t_frames).mean(dim=(1, 2, 4))
    return (probs @ v.float()).to(v.dtype), frame
