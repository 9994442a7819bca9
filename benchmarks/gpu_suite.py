"""Every GPU check and benchmark in one call (for a lent GPU session, whose minutes are few),
in order of importance, each stopped at its share of `--budget` seconds: the runtime's FPS
on virst-7b with random weights, bf16, 100 frames of 720p (reference and torch eager, then
the compiled backend in a step of its own: the issue's >= 50 FPS goal, with the stage
breakdown and a profiled run: the GPU's busy share, device time by stage and op), the
`gpu`-marked tests,
the embedded model's FPS on every backend that runs, the STF kernel benchmark, and a few
FSDP2 training steps of virst-7b (LoRA, activation checkpointing). A step that no longer
fits is skipped and says so. The suite's JSON is rewritten after every step (a call cut
short keeps what it measured); a summary table last.

    python benchmarks/gpu_suite.py [--out DIR] [--budget SECONDS] [--no-compiled] [--only S]
    # exits 0 without a GPU. Never run whole: a device call has at most 600 s. On an H200
    # at 5da2858: `--no-compiled --budget 270` took 263 s (eager virst-7b 117 s, GPU tests,
    # embedded model, STF kernel; the FSDP2 step skipped), then at once on the warm
    # machine `--only compiled --budget 500` 352 s: 11 of 15 minutes with one start
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable


def steps(out: Path, card: str, compiled: bool,
          profile_dir: str | None = None) -> list[tuple[str, int, list[str]]]:
    """(name, most seconds it may take, command), most important first."""
    fps = [PY, "benchmarks/fps.py", "--device", "cuda", "--no-real"]
    virst7b = fps + ["--preset", "virst-7b", "--random-weights", "--precision", "bf16",
                     "--frames", "100", "--size", "720p", "--runs", "3", "--profile"] + (
        ["--profile-dir", profile_dir] if profile_dir else [])
    found = [
        ("fps virst-7b eager", 180, virst7b + [
            "--backends", "eager", "--json", str(out / f"fps-virst7b-{card}.json")]),
        # the files whose imports the GPU machine has (no server packages there); without
        # the compiled backend, its runtime tests only ("not compiled" also left out the
        # kernels' `test_compiled_kernels_on_gpu`, at 5da2858)
        ("gpu tests", 240 if compiled else 90, [
            PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_kernels.py",
            "tests/test_runtime.py"] + (
                [] if compiled else ["-k", "not (reference and compiled)"])),
        # its warm-up runs virst-7b twice, compiling its units (one warm-up run took 227 s
        # on an H200 at 9f531ae), after the reference row's
        ("fps virst-7b compiled", 540, virst7b + [
            "--backends", "compiled", "--json", str(out / f"fps-virst7b-compiled-{card}.json")]),
        ("fps embedded model", 180, fps + ["--backends", "eager,compiled" if compiled else "eager",
                                           "--json", str(out / f"fps-embedded-{card}.json")]),
        ("stf kernel benchmark", 90, [PY, "benchmarks/stf_attention.py", "--json",
                                      str(out / f"stf-attention-{card}.json")]),
        ("fsdp2 virst-7b steps", 150, [
            PY, "-m", "torch.distributed.run", "--nproc_per_node", "1",
            "benchmarks/train_step.py", "--preset", "virst-7b", "--strategy", "fsdp2",
            "--lora", "--checkpointing", "--steps", "3", "--json",
            str(out / f"train-step-virst7b-{card}.json")]),
    ]
    return [step for step in found if compiled or "compiled" not in step[0]]


def run(cmd: list[str], timeout: float) -> dict:
    """One step in a process group of its own, killed whole at `timeout`."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        output, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        rc = "timeout"
    print(output[-6000:], flush=True)
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - start, 1),
            "tail": output[-3000:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="where the JSON files go")
    ap.add_argument("--budget", type=float, default=540, help="seconds for all the steps")
    ap.add_argument("--no-compiled", action="store_true",
                    help="leave the compiled backend out (its warm-up compiles virst-7b's "
                         "units for about 4 minutes on an H200)")
    ap.add_argument("--only", help="the steps whose name holds this (e.g. 'compiled', to "
                                   "give the compiled row a call of its own)")
    ap.add_argument("--profile-dir", help="keep the virst-7b rows' gzipped profiler traces here")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu_suite.py needs a CUDA GPU; nothing run.")
        return 0
    start = time.perf_counter()
    card = torch.cuda.get_device_name().replace(" ", "_")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, most, cmd in steps(out, card, not args.no_compiled, args.profile_dir):
        if args.only and args.only not in name:
            continue
        left = args.budget - (time.perf_counter() - start)
        if left < min(most, 60):
            report[name] = {"cmd": " ".join(cmd), "rc": "skipped", "seconds": 0,
                            "tail": f"skipped: {left:.0f} s of the budget left"}
        else:
            print(f"== {name} (at most {min(most, left):.0f} s)", flush=True)
            report[name] = run(cmd, min(most, left))
        (out / f"gpu-suite-{card}.json").write_text(json.dumps(
            {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda,
             "commit": os.environ.get("VIRST_COMMIT"), "budget_s": args.budget,
             "compiled": not args.no_compiled,
             "steps": report}, indent=2) + "\n")
    print(f"\nGPU suite on {card} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    print(f"{'step':<24}{'rc':>9}{'seconds':>9}")
    for name, r in report.items():
        print(f"{name:<24}{r['rc']!s:>9}{r['seconds']:>9}")
    return 0 if all(r["rc"] in (0, "skipped") for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
