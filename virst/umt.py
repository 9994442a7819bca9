"""UMT-L video tower of VideoChat-Flash: per 4-frame clip, Conv3d patches + fixed sinusoid
positions + pre-norm ViT blocks + final LayerNorm. Keys match `vision_tower.vision_tower.encoder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from virst.config import VirstConfig


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """(positions, dim) table: sin on even lanes, cos on odd, angle pos / 10000^(2*(j//2)/dim)."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2 * (j // 2) / dim)
    table = torch.where(j.long() % 2 == 0, angle.sin(), angle.cos())
    return table.to(torch.float32)


def umt_position_table(cfg: VirstConfig) -> torch.Tensor:
    """Regenerate the (clip_frames * grid^2, width) table the release never stores.

    Built on the pretraining grid (14 x 14 for UMT-L) and resized per frame, bicubic, to ours.
    """
    f, p, g, c = cfg.clip_frames, cfg.umt_pos_grid, cfg.umt_grid, cfg.umt_width
    table = sinusoid_table(f * p * p, c)
    if p != g:
        grid = table.view(f, p, p, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
        table = grid.permute(0, 2, 3, 1).reshape(f * g * g, c)
    return table


class UMTAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class UMTMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class UMTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = UMTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = UMTMlp(dim, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UMTEncoder(nn.Module):
    """(clips, clip_frames, 3, H, W) normalised frames -> (clips, clip_frames * g * g, width)."""

    def __init__(self, cfg: VirstConfig):
        super().__init__()
        p = cfg.vlm_patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(3, cfg.umt_width, (1, p, p), stride=(1, p, p))
        self.register_buffer("pos_embed", umt_position_table(cfg), persistent=False)
        self.blocks = nn.ModuleList(
            UMTBlock(cfg.umt_width, cfg.umt_heads, cfg.umt_mlp) for _ in range(cfg.umt_depth)
        )
        self.vision_layernorm = nn.LayerNorm(cfg.umt_width, eps=1e-12)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(clips.transpose(1, 2))  # (B, C, T, g, g)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.vision_layernorm(x)
