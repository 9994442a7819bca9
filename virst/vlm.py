"""VideoChat-Flash as VIRST uses it: UMT-L clips -> ToMe projector -> Qwen2, one prefill,
final (post-norm) hidden states read at the `[SEG]` positions. The lm_head is kept for the
trainer's token loss; inference never calls it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2Model

from virst.config import VirstConfig
from virst.prompt import Prompt
from virst.tome import ToMeProjector
from virst.umt import UMTEncoder


def qwen2_config(cfg: VirstConfig) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.llm_hidden, intermediate_size=cfg.llm_ffn,
        num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads,
        num_key_value_heads=cfg.llm_kv_heads, rms_norm_eps=cfg.llm_rms_eps,
        rope_theta=cfg.llm_rope_theta, max_position_embeddings=cfg.llm_max_positions,
        tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa",
    )


class VideoLLM(nn.Module):
    def __init__(self, cfg: VirstConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = UMTEncoder(cfg)
        self.mm_projector = ToMeProjector(cfg.umt_width, cfg.llm_hidden, cfg.umt_heads,
                                          cfg.tokens_per_frame * cfg.clip_frames)
        self.llm = Qwen2Model(qwen2_config(cfg))
        self.lm_head = nn.Linear(cfg.llm_hidden, cfg.vocab_size, bias=False)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) VLM frames, N a multiple of clip_frames -> (N * 16, hidden) tokens."""
        n, c, h, w = frames.shape
        clips = frames.view(n // self.cfg.clip_frames, self.cfg.clip_frames, c, h, w)
        return self.mm_projector(self.vision_tower(clips))

    def embed_prompt(self, prompt: Prompt, video: torch.Tensor, full: bool = False) -> torch.Tensor:
        """(1, L, hidden) input embeddings: text, video tokens in place of <image>, text."""
        after = prompt.after if full else prompt.inference_after
        embed = self.llm.embed_tokens
        device = embed.weight.device
        before = embed(torch.tensor(prompt.before, device=device))
        rest = embed(torch.tensor(after, device=device))
        return torch.cat([before, video.to(before.dtype), rest])[None]

    def hidden_states(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Final, normalised hidden states (1, L, hidden) of one causal prefill."""
        return self.llm(inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state
