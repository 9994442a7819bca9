"""Spatio-Temporal Fusion (STF): the two places where SAM2 features meet the language model.

- `InitialSegFusion` (stage 1, optional): the `[SEG]` input embeddings cross-attend to
  downsampled SAM2 features of the segmentation frames before the LLM runs.
- `SegPrompter` (stage 2, always on): the 10 `[SEG]` hidden states become one 10-token SAM
  prompt per segmentation frame through a 2-layer post-norm decoder whose cross-attention
  rotates keys by their (t, y, x) grid cell and queries by their frame only (`RoPE3D`).
- `stf_prompts` (ours, `stf_point_prompt`, off in the release's architecture): the prompt
  is instead a SAM2 click where the SegPrompter's last cross-attention peaks in the frame.
- `frame_motion` (ours, `stf_motion_keys`, off in the release): the SegPrompter's keys and
  values also carry each grid cell's change between neighbouring segmentation frames,
  read by a small MLP.

State-dict keys equal the official release's, so its tensors load without renaming.
This is the reference path; `virst_kernels.stf_attention` is the fused one (same weights).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn


def _downsampler(in_dim: int, out_dim: int, steps: int) -> nn.Sequential:
    """`steps` x (3x3 stride-2 conv + ReLU): the SAM2 feature map down to the STF grid."""
    layers: list[nn.Module] = []
    for i in range(steps):
        layers += [nn.Conv2d(in_dim if i == 0 else out_dim, out_dim, 3, stride=2, padding=1),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _grid_tokens(down: nn.Sequential, feats: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) features -> (B, T * g * g, C') tokens in (t, y, x) order."""
    b, t = feats.shape[:2]
    x = down(feats.flatten(0, 1))  # (B*T, C', g, g)
    return x.flatten(2).transpose(1, 2).reshape(b, t * x.shape[-2] * x.shape[-1], x.shape[1])


# ----------------------------------------------------------------------------- RoPE3D


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """GPT-J rotation of interleaved pairs: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


class RoPE3D(nn.Module):
    """3D rotary embedding for a head of `head_dim` lanes: t | y | x | free.

    Each axis gets `2 * ((head_dim // 2) // 3)` lanes (10 of 32) with inverse frequencies
    1 / 10000^(j / (lanes / 2)), each repeated for its interleaved pair. Keys laid out as
    T x grid x grid tokens rotate all three axes; queries laid out as N x T tokens rotate
    only their t lanes by their frame. Angles are built in fp32 and rotation runs in fp32.
    """

    def __init__(self, head_dim: int, grid_hw: int):
        super().__init__()
        self.head_dim, self.grid = head_dim, grid_hw
        self.axis_lanes = (head_dim // 2) // 3 * 2
        half = self.axis_lanes // 2
        inv = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("inv_freq", inv.repeat_interleave(2), persistent=False)

    def _axis_angles(self, pos: torch.Tensor) -> torch.Tensor:
        return pos.to(torch.float32)[:, None] * self.inv_freq.to(pos.device)[None, :]

    def _pad(self, *axes: torch.Tensor) -> torch.Tensor:
        """Concatenate per-axis angles and zero-fill the remaining lanes (no rotation)."""
        ang = torch.cat(axes, dim=-1)
        return F.pad(ang, (0, self.head_dim - ang.shape[-1]))

    def key_angles(self, frames: int, device=None) -> torch.Tensor:
        """(frames * grid^2, head_dim) angles; token s sits at t = s // g^2, y, x in row order."""
        g = self.grid
        s = torch.arange(frames * g * g, device=device)
        t, y, x = s // (g * g), (s // g) % g, s % g
        return self._pad(self._axis_angles(t), self._axis_angles(y), self._axis_angles(x))

    def query_angles(self, tokens: int, frames: int, device=None) -> torch.Tensor:
        """(tokens * frames, head_dim) angles; query i = n * T + t rotates t lanes by t."""
        t = torch.arange(frames, device=device).repeat(tokens)  # (no `%`: exports cleanly)
        zeros = torch.zeros(t.shape[0], 2 * self.axis_lanes, device=device)
        return self._pad(self._axis_angles(t), zeros)

    @staticmethod
    def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """Rotate (..., S, head_dim) by (S, head_dim) angles in fp32, cast back once."""
        xf = x.to(torch.float32)
        out = xf * angles.cos() + rotate_pairs(xf) * angles.sin()
        return out.to(x.dtype)


# ------------------------------------------------------------------------- SegPrompter

STF_BACKENDS = ("auto", "reference", "triton")
_backend = os.environ.get("VIRST_STF_BACKEND", "auto")


def set_stf_backend(name: str) -> None:
    """'auto' (Triton kernel on CUDA, reference elsewhere), 'reference' or 'triton'.
    Also settable with VIRST_STF_BACKEND. The kernel has no backward: training always
    takes the reference path."""
    global _backend
    if name not in STF_BACKENDS:
        raise ValueError(f"unknown STF backend {name!r}; choose one of {STF_BACKENDS}")
    _backend = name


def _use_kernel(*tensors: torch.Tensor) -> bool:
    if _backend == "reference" or (torch.is_grad_enabled() and
                                   any(t.requires_grad for t in tensors)):
        return False
    if _backend == "triton":
        return True
    return tensors[0].is_cuda and _triton_available()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class RotaryCrossAttention(nn.Module):
    """Cross-attention of N*T queries to T*g*g grid keys with RoPE3D (reference path)."""

    def __init__(self, dim: int, nhead: int, grid_hw: int):
        super().__init__()
        self.nhead, self.head_dim = nhead, dim // nhead
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.rope = RoPE3D(self.head_dim, grid_hw)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.nhead, self.head_dim).transpose(1, 2)

    def forward(self, query, memory, frames: int, key_padding_mask=None,
                return_frame_score=False, return_probs=False):
        """(B, N*T, C) queries, (B, T*g*g, C) memory -> output and, if asked, the frame
        score (B, T): attention mass per frame, mean over heads, queries and grid cells;
        or with `return_probs` the attention itself, (B, heads, N*T, T*g*g) (training)."""
        if return_frame_score and return_probs:
            raise ValueError("RotaryCrossAttention returns the frame score or the attention, "
                             "not both: ask for one")
        q, k, v = (self._heads(p(x)) for p, x in
                   ((self.q_proj, query), (self.k_proj, memory), (self.v_proj, memory)))
        if not return_probs and _use_kernel(q, k, v):
            from virst_kernels.stf_attention import stf_cross_attention

            res = stf_cross_attention(q, k, v, frames, grid_hw=self.rope.grid,
                                      key_padding_mask=key_padding_mask,
                                      return_frame_score=return_frame_score)
            out, score = res if return_frame_score else (res, None)
        else:
            out, probs = self.reference(q, k, v, frames, q.shape[2] // frames, key_padding_mask)
            score = probs if return_probs else None
            if return_frame_score:
                b, h, s_q, s_k = probs.shape
                score = probs.view(b, h, s_q, frames, s_k // frames).mean(dim=(1, 2, 4))
        return self.o_proj(out.transpose(1, 2).flatten(2)), score

    def reference(self, q, k, v, frames, tokens, key_padding_mask=None):
        """Full fp32 score matrix; a fully masked row gives NaN, as in the original."""
        q = self.rope.rotate(q, self.rope.query_angles(tokens, frames, q.device))
        k = self.rope.rotate(k, self.rope.key_angles(frames, k.device))
        scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(self.head_dim)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)
        return (probs @ v.float()).to(v.dtype), probs


class SegPrompterLayer(nn.Module):
    """Post-norm decoder layer: self-attention, RoPE3D cross-attention, FFN."""

    def __init__(self, dim: int, nhead: int, grid_hw: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = RotaryCrossAttention(dim, nhead, grid_hw)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, memory, frames, query_padding_mask=None, return_frame_score=False,
                return_probs=False):
        sa, _ = self.self_attn(x, x, x, key_padding_mask=query_padding_mask, need_weights=False)
        x = self.norm1(x + self.dropout(sa))
        ca, score = self.cross_attn(x, memory, frames, return_frame_score=return_frame_score,
                                    return_probs=return_probs)
        x = self.norm2(x + self.dropout(ca))
        x = self.norm3(x + self.dropout(self.ff(x)))
        return x, score


def frame_motion(tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, T*g*g, C) grid tokens in (t, y, x) order -> each cell's change across its frame,
    next minus previous segmentation frame (the edges repeat their frame; one frame: zero).
    A still object's cells do not change, a moving one's do, by how far and which way."""
    b, s, c = tokens.shape
    x = tokens.reshape(b, frames, s // frames, c)
    padded = torch.cat([x[:, :1], x, x[:, -1:]], dim=1)
    return (padded[:, 2:] - padded[:, :-2]).reshape(b, s, c)


class SegPrompter(nn.Module):
    """[SEG] hidden states (B, N, in_dim) + SAM2 features (B, T, C, H, W) -> (B, N, T, C).

    One prompt of N tokens per segmentation frame. `return_frame_score` also gives the
    last layer's attention mass per frame, (B, T) (sums to 1 / grid^2; unused at inference);
    `return_attention` the last layer's attention, (B, heads, N*T, T*g*g) (the grounding
    loss, train/losses.py).
    """

    def __init__(self, in_dim: int, token_dim: int = 256, grid_hw: int = 8, nhead: int = 8,
                 n_layers: int = 2, feat_hw: int = 64, max_frames: int = 100,
                 motion_keys: bool = False):
        super().__init__()
        self.token_dim, self.grid_hw, self.max_frames = token_dim, grid_hw, max_frames
        steps = int(round(math.log2(feat_hw // grid_hw)))
        self.spatial_down = _downsampler(token_dim, token_dim, steps)
        self.memory_norm = nn.LayerNorm(token_dim)
        if motion_keys:  # an MLP: "moves" is the size of the change, not linear in it
            self.motion_proj = nn.Sequential(nn.Linear(token_dim, token_dim), nn.GELU(),
                                             nn.Linear(token_dim, token_dim))
            # zero output: switching it on keeps a trained model's outputs to start with
            nn.init.zeros_(self.motion_proj[2].weight)
            nn.init.zeros_(self.motion_proj[2].bias)
        self.motion_keys = motion_keys
        self.seg_proj = nn.Linear(in_dim, token_dim)
        self.decoder = nn.ModuleList(
            SegPrompterLayer(token_dim, nhead, grid_hw) for _ in range(n_layers)
        )

    def forward(self, seg_token, image_token, seg_mask=None, return_frame_score=False,
                return_attention=False):
        if return_frame_score and return_attention:
            raise ValueError("SegPrompter returns the frame score or the attention, not both")
        b, n, _ = seg_token.shape
        t = image_token.shape[1]
        if image_token.shape[0] != b or image_token.shape[2] != self.token_dim:
            raise ValueError(
                f"SegPrompter: seg_token {tuple(seg_token.shape)} and image_token "
                f"{tuple(image_token.shape)} disagree (batch or {self.token_dim} channels)"
            )
        if t > self.max_frames:
            raise ValueError(f"SegPrompter: {t} frames exceed max_frames={self.max_frames}")
        tokens = _grid_tokens(self.spatial_down, image_token)
        if self.motion_keys:
            tokens = tokens + self.motion_proj(frame_motion(tokens, t))
        memory = self.memory_norm(tokens)
        query = self.seg_proj(seg_token)[:, :, None, :].expand(b, n, t, self.token_dim)
        x = query.reshape(b, n * t, self.token_dim)
        pad = None if seg_mask is None else ~seg_mask.bool()[:, :, None].expand(b, n, t).flatten(1)
        score = None
        for i, layer in enumerate(self.decoder):
            last = i == len(self.decoder) - 1
            x, score = layer(x, memory, t, pad, return_frame_score=return_frame_score and last,
                             return_probs=return_attention and last)
        out = x.view(b, n, t, self.token_dim)
        return (out, score) if return_frame_score or return_attention else out


# ------------------------------------------------------------------ point prompts


def own_frame_attention(attention: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, heads, N*T, T*cells) attention (queries n-major, keys t-major) -> (B, heads, N,
    T, cells): each query's attention on the grid cells of its own frame. A gather of the
    T*cells entries wanted (GatherElements in ONNX), not `torch.diagonal` (no export) nor a
    product with an identity mask summed (T times the work; the STF unit took 21.9 ms with
    it, 19.8 without, 64 frames, ONNX Runtime)."""
    b, h, rows, keys = attention.shape
    cells = keys // frames
    probs = attention.reshape(b, h, rows // frames, frames, keys)
    t = torch.arange(frames, device=attention.device)
    own = t[:, None] * cells + torch.arange(cells, device=attention.device)  # (T, cells)
    return probs.gather(4, own.expand(b, h, rows // frames, frames, cells))


def attention_points(attention: torch.Tensor, frames: int, grid: int, size: int,
                     power: float = 1.0) -> torch.Tensor:
    """Where STF looks in each frame, as a click: (B, heads, N*T, T*g*g) last-layer attention
    (queries n-major, keys t-major) -> (B, T, 2) pixel (x, y) at model resolution `size`.

    Each frame's own cells, attention averaged over heads and queries; the click is the
    centre of the 3 x 3 cells around the peak weighted by attention ** `power` (a cell is
    larger than some objects, the centre of two neighbours lands between them; a power
    below 1 gives the neighbours more say). Differentiable in the
    attention except for the choice of the peak; in ONNX ops TensorRT has."""
    b = attention.shape[0]
    heat = own_frame_attention(attention, frames).mean((1, 2)).reshape(b, frames, grid, grid)
    peak = heat.flatten(2).argmax(-1)  # (B, T)
    cells = torch.arange(grid, device=heat.device)

    def near(p: torch.Tensor) -> torch.Tensor:  # |cell - p| <= 1 as (B, T, g), without Abs
        d = cells[None, None] - p[..., None]
        return (d * d < 2).to(heat.dtype)

    near_y, near_x = near(peak // grid), near(peak % grid)
    if power != 1.0:  # floored (by Max, an op TensorRT has): x ** power is steep at 0
        heat = torch.maximum(heat, heat.new_tensor(1e-30)) ** power
    w = heat * near_y[..., :, None] * near_x[..., None, :]
    centre = (cells.to(heat.dtype) + 0.5) * (size / grid)
    x = (w.sum(2) * centre).sum(-1) / w.sum((2, 3))
    y = (w.sum(3) * centre).sum(-1) / w.sum((2, 3))
    return torch.stack([x, y], dim=-1) - 0.5  # pixel indices: SAM2 adds 0.5 back


def stf_prompts(prompter: SegPrompter, seg_hidden: torch.Tensor, image_token: torch.Tensor,
                point_encoder=None, return_attention: bool = False, click_power: float = 1.0):
    """The anchor prompts of every segmentation frame, (B, P, T, C): STF's tokens, or with a
    SAM2 prompt encoder as `point_encoder` (`stf_point_prompt`, ours) the click at STF's
    attention peak with SAM2's padding point, P = 2. A decoder trained on clicks finds a
    click's object by position; STF's tokens carry the named object's appearance, which
    does not tell look-alikes apart (MODEL_CARD.md). The click needs the attention itself,
    so this path runs STF's reference attention, not the fused kernel."""
    if point_encoder is None:
        return prompter(seg_hidden, image_token, return_attention=return_attention)
    tokens, attention = prompter(seg_hidden, image_token, return_attention=True)
    b, t = image_token.shape[:2]
    size = point_encoder.input_image_size[0]
    points = attention_points(attention, t, prompter.grid_hw, size,
                              click_power).reshape(b * t, 1, 2)
    labels = torch.ones(b * t, 1, dtype=torch.int32, device=points.device)
    clicks, _ = point_encoder(points=(points, labels), boxes=None, masks=None)
    out = clicks.reshape(b, t, *clicks.shape[1:]).transpose(1, 2).to(tokens.dtype)
    return (out, attention) if return_attention else out


# -------------------------------------------------------------------- InitialSegFusion


class InitialSegFusion(nn.Module):
    """Stage-1 STF: [SEG] input embeddings attend to SAM2 features; gated residual."""

    def __init__(self, hidden_dim: int, vision_dim: int = 256, token_dim: int = 256,
                 grid_hw: int = 8, num_heads: int = 8, feat_hw: int = 64):
        super().__init__()
        steps = int(round(math.log2(feat_hw // grid_hw)))
        self.spatial_down = _downsampler(vision_dim, token_dim, steps)
        self.spatial_norm = nn.LayerNorm(token_dim)
        self.vision_proj = nn.Linear(token_dim, hidden_dim)
        self.norm_q = nn.LayerNorm(hidden_dim)
        self.norm_kv = nn.LayerNorm(hidden_dim)
        self.cross_attn = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.gate = nn.Parameter(torch.tensor(0.1))

    def forward(self, seg_embeds: torch.Tensor, vision_feats: torch.Tensor) -> torch.Tensor:
        tokens = self.vision_proj(self.spatial_norm(_grid_tokens(self.spatial_down, vision_feats)))
        kv = self.norm_kv(tokens)
        fused, _ = self.cross_attn(self.norm_q(seg_embeds), kv, kv, need_weights=False)
        return seg_embeds + self.gate * fused
