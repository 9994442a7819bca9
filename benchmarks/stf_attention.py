"""STF cross-attention on a GPU: reference module, reference under torch.compile, SDPA with
a separate RoPE kernel, the fused kernel, and the fused kernel with split-KV, over
T in {8, 32, 100} and N in {1, 4, 10} (B=1, 8 heads of 32, 8x8 grid, bf16 inputs).
Median microseconds (triton.testing.do_bench) and achieved TFLOP/s (QK^T + PV).

    python benchmarks/stf_attention.py [--json benchmarks/results/stf-attention-<card>.json]

On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _variants(q, k, v, t, grid):
    import torch
    import torch.nn.functional as F

    from virst.stf import RotaryCrossAttention
    from virst_kernels.rope3d import rope3d
    from virst_kernels.stf_attention import stf_cross_attention

    attn = RotaryCrossAttention(q.shape[1] * q.shape[3], q.shape[1], grid).to(q.device)
    tokens = q.shape[2] // t
    compiled = torch.compile(attn.reference)
    return {
        "reference": lambda: attn.reference(q, k, v, t, tokens),
        "reference+compile": lambda: compiled(q, k, v, t, tokens),
        "sdpa+rope": lambda: F.scaled_dot_product_attention(
            rope3d(q, t, grid, "query"), rope3d(k, t, grid, "key"), v),
        "fused": lambda: stf_cross_attention(q, k, v, t, grid_hw=grid, split_kv=1),
        "fused+splitkv": lambda: stf_cross_attention(q, k, v, t, grid_hw=grid),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/stf_attention.py needs a CUDA GPU (Triton kernels are only timed there); "
              "nothing measured.")
        return 0
    import triton.testing

    card = torch.cuda.get_device_name()
    heads, d, grid = 8, 32, 8
    rows = []
    for t in (8, 32, 100):
        for n in (1, 4, 10):
            gen = torch.Generator(device="cuda").manual_seed(0)
            shape_q, shape_k = (1, heads, n * t, d), (1, heads, grid * grid * t, d)
            q = torch.randn(shape_q, device="cuda", generator=gen, dtype=torch.bfloat16)
            k = torch.randn(shape_k, device="cuda", generator=gen, dtype=torch.bfloat16)
            v = torch.randn(shape_k, device="cuda", generator=gen, dtype=torch.bfloat16)
            flops = 4 * heads * n * t * grid * grid * t * d
            for name, fn in _variants(q, k, v, t, grid).items():
                us = triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3
                rows.append({"T": t, "N": n, "variant": name, "us": us,
                             "tflops": flops / us / 1e6})
    out = Path(args.json or f"benchmarks/results/stf-attention-{card.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"card": card, "torch": torch.__version__,
                               "triton": triton.__version__, "rows": rows}, indent=2) + "\n")
    names = list(dict.fromkeys(r["variant"] for r in rows))
    print(f"STF cross-attention on {card} (bf16, B=1, H=8, D=32, 8x8 grid), median us")
    print(f"{'T':>4}{'N':>4}" + "".join(f"{n:>19}" for n in names) + f"{'ref/fused':>11}")
    for t in (8, 32, 100):
        for n in (1, 4, 10):
            sel = {r["variant"]: r for r in rows if r["T"] == t and r["N"] == n}
            best = min(sel["fused"]["us"], sel["fused+splitkv"]["us"])
            cells = "".join(f"{sel[v]['us']:10.1f} ({sel[v]['tflops']:5.1f})" for v in names)
            print(f"{t:>4}{n:>4}{cells}{sel['reference']['us'] / best:10.1f}x")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
