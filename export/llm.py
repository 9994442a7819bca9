"""The Qwen2 LM prepared for vLLM: a Hugging Face `Qwen2ForCausalLM` folder (LoRA already
merged in our weights) that vLLM's pooling runner serves with `prompt_embeds` input
(`runner="pooling", convert="embed"`, `PoolerConfig(task="token_embed")`), plus the
embedding table the runtime needs to build those `prompt_embeds` (text embeddings around
the video tokens). The vision side stays outside vLLM (the `vision` ONNX unit).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen2ForCausalLM

from virst.files import save_tensors
from virst.model import VirstModel
from virst.vlm import qwen2_config


def write_llm_folder(model: VirstModel, folder: Path, dtype: torch.dtype) -> list[Path]:
    """Write the HF folder and `embed_tokens.safetensors`; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    config = qwen2_config(model.config)
    config.architectures = ["Qwen2ForCausalLM"]
    config.dtype = str(dtype).removeprefix("torch.")
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(config)
    state = {f"model.{k}": v for k, v in model.vlm.llm.state_dict().items()}
    state["lm_head.weight"] = model.vlm.lm_head.weight
    missing = set(hf.state_dict()) - set(state)
    if missing:
        raise RuntimeError(f"LLM folder would miss {sorted(missing)[:4]}")
    tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()}
    save_tensors(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    files = [folder / "model.safetensors", folder / "config.json"]
    if model.tokenizer is not None:  # vLLM's pooling runner needs a tokenizer beside it
        model.tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length":
             model.config.llm_max_positions}, indent=2) + "\n")
        files += [folder / "tokenizer.json", folder / "tokenizer_config.json"]
    embed = folder.parent / "embed_tokens.safetensors"
    save_tensors({"embed_tokens": tensors["model.embed_tokens.weight"]}, str(embed))
    return files + [embed]
