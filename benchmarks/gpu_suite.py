"""Every GPU check and benchmark in one call (for a lent GPU session): the `gpu`-marked
tests, the kernel benchmark, the runtime's FPS (tiny model on every backend that runs;
virst-7b with random weights, bf16, 100 frames of 720p: torch eager vs compiled, the
issue's >= 50 FPS goal), and a few FSDP2 training steps of virst-7b (LoRA, activation
checkpointing) with their peak memory; a summary table last, results in one JSON file
each under benchmarks/results/.

    python benchmarks/gpu_suite.py        # ~10 minutes on an H100; exits 0 without a GPU
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str]) -> dict:
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    print(res.stdout[-4000:], res.stderr[-2000:], sep="\n")
    return {"cmd": " ".join(cmd), "rc": res.returncode,
            "seconds": round(time.perf_counter() - start, 1), "tail": res.stdout[-1500:]}


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu_suite.py needs a CUDA GPU; nothing run.")
        return 0
    card = torch.cuda.get_device_name().replace(" ", "_")
    results = Path("benchmarks/results")
    results.mkdir(parents=True, exist_ok=True)
    steps = {
        "gpu tests": [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"],
        "kernel benchmark": [sys.executable, "benchmarks/stf_attention.py", "--json",
                             str(results / f"stf-attention-{card}.json")],
        "fps tiny": [sys.executable, "benchmarks/fps.py", "--device", "cuda", "--no-real",
                     "--json", str(results / f"fps-tiny-{card}.json")],
        "fps virst-7b 720p": [sys.executable, "benchmarks/fps.py", "--preset", "virst-7b",
                              "--random-weights", "--device", "cuda", "--precision", "bf16",
                              "--frames", "100", "--size", "720p", "--backends",
                              "eager,compiled", "--runs", "2", "--json",
                              str(results / f"fps-virst7b-{card}.json")],
        "fsdp2 virst-7b steps": [sys.executable, "-m", "torch.distributed.run",
                                 "--nproc_per_node", "1", "benchmarks/train_step.py",
                                 "--preset", "virst-7b", "--strategy", "fsdp2", "--lora",
                                 "--checkpointing", "--steps", "3", "--json",
                                 str(results / f"train-step-virst7b-{card}.json")],
    }
    report = {name: run(cmd) for name, cmd in steps.items()}
    (results / f"gpu-suite-{card}.json").write_text(json.dumps(
        {"card": card, "torch": torch.__version__, "steps": report}, indent=2) + "\n")
    print(f"\nGPU suite on {card}")
    print(f"{'step':<20}{'rc':>4}{'seconds':>9}")
    for name, r in report.items():
        print(f"{name:<20}{r['rc']:>4}{r['seconds']:>9}")
    return max(r["rc"] for r in report.values())


if __name__ == "__main__":
    sys.exit(main())
