"""The trainer: stages in order, AdamW with warm-up and cosine decay, gradient accumulation,
bf16 autocast on GPUs that have it, checkpoints that resume to the same state, a progress
bar with the loss, and the shapes validation scores at the end of every stage.

Prompt following (`virst.eval.prompting.click_following`: click IoU on held-out frames and
the agreement between masks of clicks on different objects) is measured every
`check_every` steps of stages that train SAM2's heads and after every stage; a run whose
agreement is still above `collapse_agreement` after the prompt-following stage stops there
with a message instead of training for hours on a decoder that ignores its prompt.

    OUT/checkpoint/      model.safetensors + state.pt (optimizer, schedule, RNG, position)
    OUT/history.json     per-stage losses and validation tables
    OUT/model/           the final model (LoRA merged), loadable with from_pretrained
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from virst.errors import TrainingError
from virst.eval.prompting import click_following, shapes_views
from virst.files import save_tensors
from virst.model import VirstModel
from virst.sam2_model import init_prompt_attention
from virst.train.losses import total
from virst.train.stages import STAGES, apply_lora, merge_lora, set_trainable
from virst.train.step import Sample, forward_losses, shapes_sample


@dataclass
class TrainConfig:
    out: str
    stages: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    steps: dict = field(default_factory=lambda: {0: 1000, 1: 600, 2: 400, 3: 800})
    lr: dict = field(default_factory=lambda: {0: 1e-3, 1: 6e-4, 2: 3e-4, 3: 2e-4})
    accumulate: int = 1
    lora: bool = False  # LoRA on the LLM in stages 1-3 (the released model); tiny: full LLM
    seed: int = 0
    save_every: int = 50
    eval_videos: int = 24  # shapes valid videos scored after each stage (0: skip)
    warmup: float = 0.05
    clip: float = 1.0
    propagate_every: int = 2  # stage 0: every n-th step trains propagation from clicks
    points_every: int = 4  # stages 2-3: every n-th sample trains SAM2 clicks (0: never)
    prompt_init: bool = False  # from scratch: decoder cross-attention k = q (sam2_model.py)
    # stage 0 trains the mask decoder on a frozen (random) image encoder first: trained
    # together from step 0, encoder and decoder settle on "mask every salient object"
    decoder_first: int = 500
    # stage 0 click steps mix this many videos (CLICK_FRAMES frames each): within one
    # video's frames the decoder settles on "its salient objects" and never escapes
    click_videos: int = 8
    check_every: int = 100  # prompt-following check every n steps (stages with SAM2 heads)
    check_videos: int = 12  # shapes valid videos of that check (0: no checks)
    collapse_agreement: float = 0.9  # stop after stage 0 when clicks agree more than this

    def __post_init__(self):
        self.steps = {int(k): int(v) for k, v in self.steps.items()}
        self.lr = {int(k): float(v) for k, v in self.lr.items()}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _schedule(optimizer, steps: int, warmup: float):
    warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    def __init__(self, model: VirstModel, cfg: TrainConfig,
                 sample_fn: Callable[[int], Sample] = shapes_sample):
        self.model, self.cfg, self.sample_fn = model, cfg, sample_fn
        self.out = Path(cfg.out)
        self.ckpt = self.out / "checkpoint"
        self.history: list[dict] = []
        self.position = {"stage_index": 0, "step": 0, "seen": 0}
        self.seconds = 0.0
        self.checks: list[dict] = []  # prompt-following checks of the current stage
        self._views = None  # held-out frames of those checks, built once

    # ------------------------------------------------------------------ stage set-up
    def _uses_lora(self, stage: int) -> bool:
        return self.cfg.lora and stage in (1, 2, 3)

    def _begin_stage(self, stage: int) -> None:
        if self._uses_lora(stage):
            apply_lora(self.model)
        names = set_trainable(self.model, STAGES[stage], self._uses_lora(stage))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr[stage], weight_decay=0.0)
        self.scheduler = _schedule(self.optimizer, self.cfg.steps[stage], self.cfg.warmup)
        self.trainable = names

    def _end_stage(self, stage: int) -> None:
        if self._uses_lora(stage):
            merge_lora(self.model)
        for p in self.model.parameters():
            p.requires_grad_(True)

    # ------------------------------------------------------------------- checkpoints
    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.partial-", dir=self.out))
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_tensors(state, str(tmp / "model.safetensors"))
        torch.save({"position": self.position, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "rng": _rng_state(),
                    "history": self.history, "seconds": self.seconds, "checks": self.checks,
                    "config": asdict(self.cfg)}, tmp / "state.pt")
        old = self.out / ".checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.ckpt.exists():
            os.replace(self.ckpt, old)
        os.replace(tmp, self.ckpt)
        shutil.rmtree(old, ignore_errors=True)

    def restore(self) -> bool:
        """Continue from OUT/checkpoint if there is one; False when starting fresh."""
        if not (self.ckpt / "state.pt").is_file():
            return False
        state = torch.load(self.ckpt / "state.pt", weights_only=False)
        self.position, self.history = state["position"], state["history"]
        self.seconds, self.checks = state["seconds"], state.get("checks", [])
        stage = self.cfg.stages[self.position["stage_index"]]
        self._begin_stage(stage)
        weights = load_file(str(self.ckpt / "model.safetensors"))
        self.model.load_state_dict(weights, strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        return True

    # ------------------------------------------------------------------------- loop
    def _step(self, stage: int) -> dict[str, float]:
        self.model.train()
        logged: dict[str, float] = {}
        device = self.model.device
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        samples, forced = self.cfg.accumulate, None
        if stage == 0:  # decoder first (encoder frozen), then clicks and click propagation
            step = self.position["step"]
            frozen = step < self.cfg.decoder_first
            self.model.sam2.image_encoder.requires_grad_(not frozen)
            every = self.cfg.propagate_every
            propagating = not frozen and every > 0 and step % every == every - 1
            forced = "click_propagate" if propagating else "clicks"
            samples = 1 if propagating else self.cfg.click_videos
        for _ in range(samples):
            index = self.cfg.seed * 1_000_000 + self.position["seen"]
            sample = self.sample_fn(index)
            mode = forced or STAGES[stage].mode_for(self.position["seen"], self.cfg.points_every)
            self.position["seen"] += 1
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                parts = forward_losses(self.model, sample, mode)
                loss = total(parts) / samples
            loss.backward()
            for k, v in parts.items():
                logged[k] = logged.get(k, 0.0) + v.item() / samples
            logged["loss"] = logged.get("loss", 0.0) + loss.item()
        params = [p for p in self.model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logged

    # --------------------------------------------------------------- prompt following
    def _check_prompts(self, stage: int, bar) -> dict | None:
        if self.cfg.check_videos <= 0:
            return None
        if self._views is None:
            size = self.model.config.sam_image_size
            self._views = shapes_views(self.cfg.check_videos, size=size)
        result = {"stage": stage, "step": self.position["step"],
                  **click_following(self.model, self._views)}
        bar.write(f"stage {stage} step {result['step']}: click IoU {result['click_iou']:.3f}, "
                  f"agreement between clicks on different objects "
                  f"{result['click_agreement']:.3f}")
        return result

    def _stop_if_collapsed(self, stage: int, check: dict | None) -> None:
        if stage != 0 or check is None or check["click_agreement"] <= self.cfg.collapse_agreement:
            return
        raise TrainingError(
            f"after the prompt-following stage the mask decoder still ignores its prompt: "
            f"masks of clicks on different objects agree {check['click_agreement']:.2f} "
            f"(limit {self.cfg.collapse_agreement}), click IoU {check['click_iou']:.2f}. "
            f"Training the expression stages on it would waste hours. Check the decoder's "
            f"heads (sam_decoder_heads: 16 lanes per head) and its from-scratch start "
            f"(prompt_init), or give stage 0 more steps; the checkpoint is in {self.ckpt}")

    # ------------------------------------------------------------------------- loop
    def run(self, stop_after: int | None = None, validate: Callable | None = None) -> None:
        """Train every remaining step. `stop_after` optimizer steps ends this call early
        (as an interruption would), after a checkpoint."""
        torch.manual_seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        resumed = self.restore()
        if not resumed and self.cfg.prompt_init:
            init_prompt_attention(self.model.sam2)
        done_now = 0
        while self.position["stage_index"] < len(self.cfg.stages):
            stage = self.cfg.stages[self.position["stage_index"]]
            if not resumed:
                self._begin_stage(stage)
            resumed = False
            total_steps = self.cfg.steps[stage]
            bar = tqdm(total=total_steps, initial=self.position["step"],
                       desc=f"stage {stage} ({STAGES[stage].name})")
            losses: list[dict] = []
            while self.position["step"] < total_steps:
                start = time.perf_counter()
                logged = self._step(stage)
                self.seconds += time.perf_counter() - start
                losses.append(logged)
                self.position["step"] += 1
                done_now += 1
                bar.update()
                bar.set_postfix(loss=f"{logged['loss']:.3f}", dice=f"{logged['dice']:.3f}")
                if (self.cfg.check_every and "sam_heads" in STAGES[stage].groups
                        and self.position["step"] % self.cfg.check_every == 0
                        and self.position["step"] < total_steps):
                    self.checks.append(self._check_prompts(stage, bar))
                if (self.position["step"] % self.cfg.save_every == 0
                        or self.position["step"] == total_steps
                        or (stop_after is not None and done_now >= stop_after)):
                    self.save()
                if stop_after is not None and done_now >= stop_after:
                    bar.close()
                    return
            final_check = self._check_prompts(stage, bar)
            bar.close()
            self._stop_if_collapsed(stage, final_check)
            self._end_stage(stage)
            record = {"stage": stage, "name": STAGES[stage].name, "steps": total_steps,
                      "final_losses": _mean(losses[-20:]), "train_seconds": self.seconds,
                      "loss_curve": [round(x["loss"], 4) for x in losses],
                      "prompt_following": [c for c in [*self.checks, final_check] if c]}
            self.checks = []
            if validate is not None:
                record["validation"] = validate(self.model, stage)
            self.history.append(record)
            self.position = {"stage_index": self.position["stage_index"] + 1, "step": 0,
                             "seen": self.position["seen"]}
            if self.position["stage_index"] < len(self.cfg.stages):
                self._begin_stage(self.cfg.stages[self.position["stage_index"]])
                resumed = True
                self.save()
        (self.out / "history.json").write_text(json.dumps(self.history, indent=2) + "\n")
        self.model.eval().save_pretrained(self.out / "model")


def _mean(rows: list[dict]) -> dict[str, float]:
    if not rows:
        return {}
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
