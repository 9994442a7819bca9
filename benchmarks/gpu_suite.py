"""Every GPU check and benchmark in one call (for a lent GPU session): the `gpu`-marked
tests, then the kernel benchmark; a summary table last, all results in one JSON file.

    python benchmarks/gpu_suite.py        # ~3 minutes on an H100; exits 0 without a GPU
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
        "kernel benchmark": [sys.executable, "benchmarks/kernels.py", "--json",
                             str(results / f"kernels-{card}.json")],
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
