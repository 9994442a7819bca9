"""The "tome16_mlp_hd64" projector: bipartite token merging per clip, then a 2-layer MLP.

Merging follows Token Merging (Bolya et al.) with size-weighted averages: alternate tokens
form sets A and B, every A token finds its most similar B token (cosine of the head-averaged
features), the r best-matched A tokens are averaged into their B partners, and the sequence
becomes [unmerged A tokens in descending match order, B tokens]. Order matters downstream.
"""

from __future__ import annotations

import torch
from torch import nn


def merge_schedule(tokens: int, target: int) -> list[int]:
    """Tokens removed per step: halve while more than half must go, then remove the rest."""
    if tokens <= target:
        raise ValueError(f"ToMe needs more than {target} tokens, got {tokens}")
    steps = []
    while tokens != target:
        r = tokens - target if tokens - target <= tokens // 2 else tokens // 2
        steps.append(r)
        tokens -= r
    return steps


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, r: int, heads: int):
    """One ToMe step on (B, P, C) tokens with (B, P, 1) sizes; returns (B, P - r, ...) both."""
    b, p, c = x.shape
    with torch.no_grad():
        metric = x.view(b, p, heads, c // heads).mean(2)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        score = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
        best, partner = score.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        keep, move = order[:, r:], order[:, :r]
        dest = partner.gather(1, move)

    def merge(t: torch.Tensor) -> torch.Tensor:
        a, bset = t[:, ::2], t[:, 1::2]
        merged = bset.scatter_add(1, dest[..., None].expand(-1, -1, t.shape[-1]), _gather(a, move))
        return torch.cat([_gather(a, keep), merged], dim=1)

    total = merge(x * size)
    size = merge(size)
    return total / size, size


class ToMeProjector(nn.Module):
    """(clips, frames*g*g, width) -> (clips * frames * tokens_per_frame, llm_hidden)."""

    def __init__(self, width: int, hidden: int, heads: int, tokens_per_clip: int):
        super().__init__()
        self.heads, self.tokens_per_clip = heads, tokens_per_clip
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        size = torch.ones_like(x[..., :1])
        for r in merge_schedule(x.shape[1], self.tokens_per_clip):
            x, size = bipartite_merge(x, size, r, self.heads)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.merge(x)).flatten(0, 1)
