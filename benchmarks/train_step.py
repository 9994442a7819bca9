"""Seconds and peak memory of training steps, for the memory plan's numbers to be checked:

    torchrun --nproc_per_node 1 benchmarks/train_step.py --preset virst-7b --strategy fsdp2 \\
        --lora --checkpointing --steps 3 --json benchmarks/results/train-step.json

Random weights (speed and memory do not depend on them), stage 3 (everything trains), the
trainer's own step (virst/train/trainer.py) with the chosen strategy; nothing is saved.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--strategy", default="fsdp2", choices=["ddp", "fsdp2"])
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from virst.model import VirstModel
    from virst.train import distributed as D
    from virst.train.trainer import TrainConfig, Trainer

    world = D.init_world(D.device_for(D.World()))
    device = D.device_for(world)
    start = time.perf_counter()
    model = VirstModel.from_preset(args.preset, device=device)
    built = time.perf_counter() - start
    cfg = TrainConfig(out=tempfile.mkdtemp(), stages=[args.stage], lora=args.lora,
                      strategy=args.strategy, checkpointing=args.checkpointing,
                      accumulate=world.size, eval_videos=0, check_videos=0)
    trainer = Trainer(model, cfg, world=world)
    trainer._begin_stage(args.stage)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        logged = trainer._step(args.stage)
        trainer.position["step"] += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = {"preset": args.preset, "strategy": args.strategy, "world": world.size,
              "lora": args.lora, "checkpointing": args.checkpointing, "stage": args.stage,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "build_seconds": round(built, 1), "step_seconds": [round(s, 2) for s in seconds],
              "peak_gib": None if peak is None else round(peak, 1),
              "last_loss": round(logged["loss"], 4)}
    if world.main:
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
