"""The trainer: stages in order, AdamW with warm-up and cosine decay, a global batch per
step (gradient accumulation, split over the ranks of a `torchrun` launch: DDP or FSDP2,
virst/train/distributed.py), bf16 autocast on GPUs that have it, sharded checkpoints that
resume to the same state on any number of ranks, a progress bar with the loss (rank 0),
and the shapes validation scores at the end of every stage.

Every sample draws its random numbers (dropout) from a seed of its own, so that the same
samples give the same step whichever rank, world size or resume point computes them.

Prompt following (`virst.eval.prompting.click_following`: click IoU on held-out frames and
the agreement between masks of clicks on different objects; `track_following`: the same for
masks SAM2's memory propagates from a click over the next frames) is measured every
`check_every` steps of stages that train SAM2's heads and after every stage; a run whose
agreement is still above `collapse_agreement` after the prompt-following stage stops there
with a message instead of training for hours on a decoder that ignores its prompt.

    OUT/checkpoint/      shards/ (torch.distributed.checkpoint: model, optimizer) + state.pt
                         (schedule, position, history)
    OUT/history.json     per-stage losses and validation tables
    OUT/model/           the final model (LoRA merged), loadable with from_pretrained
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from virst.checkpoint import merge_lora
from virst.errors import ConfigError, TrainingError
from virst.eval.prompting import click_following, shapes_clips, shapes_views, track_following
from virst.model import VirstModel, load_checked
from virst.sam2_model import init_prompt_attention
from virst.train import distributed as D
from virst.train.losses import total
from virst.train.stages import LORA_ALPHA, STAGES, apply_lora, set_trainable
from virst.train.step import Sample, ground_features, shapes_sample


@dataclass
class TrainConfig:
    out: str
    stages: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    steps: dict = field(default_factory=lambda: {0: 1200, 1: 1000, 2: 400, 3: 800})
    lr: dict = field(default_factory=lambda: {0: 1e-3, 1: 6e-4, 2: 3e-4, 3: 2e-4})
    accumulate: int = 1  # samples per optimizer step, over all ranks together
    lora: bool = False  # LoRA on the LLM in stages 1-3 (the released model); tiny: full LLM
    strategy: str = "ddp"  # with several ranks: "ddp" or "fsdp2"
    checkpointing: bool = False  # activation checkpointing of the transformer blocks
    train_videos: int = 100_000  # shapes training videos per epoch of the sampler
    first_video: int = 0  # the sampler's videos are first_video .. first_video + train_videos - 1
    seed: int = 0
    save_every: int = 50
    eval_videos: int = 24  # shapes valid videos scored after each stage (0: skip)
    warmup: float = 0.05
    clip: float = 1.0
    propagate_every: int = 2  # stage 0: every n-th step trains propagation from clicks
    points_every: int = 4  # stages 2-3: every n-th sample trains SAM2 clicks (0: never)
    prompt_init: bool = False  # from scratch: decoder cross-attention k = q (sam2_model.py)
    # from scratch: the "expression" and "grounding" losses (train/losses.py)
    scratch_losses: bool = False
    # stage 0 trains the mask decoder on a frozen (random) image encoder first, until a
    # prompt-following check shows click agreement below `follows_agreement` (or for at most
    # `decoder_first` steps): trained together from step 0, or unfrozen before the decoder
    # follows its clicks, encoder and decoder settle on "mask every salient object"
    decoder_first: int = 1000
    follows_agreement: float = 0.25
    # stage 0 click steps mix this many videos (CLICK_FRAMES frames each): within one
    # video's frames the decoder settles on "its salient objects" and never escapes
    click_videos: int = 8
    check_every: int = 100  # prompt-following check every n steps (stages with SAM2 heads)
    check_videos: int = 12  # shapes valid videos of that check (0: no checks)
    check_frames: int = 8  # tracking check: a click on their first frame, tracked over the rest
    collapse_agreement: float = 0.9  # stop after stage 0 when clicks agree more than this
    # stage 1 as "ground" mode (train/step.py, ours): where STF looks and nothing else, no
    # mask decoder. Its encoders are frozen, so each training video's features are kept
    # after their first use (train_videos of them, ~3 MB each at tiny): later epochs over
    # the pool cost the VLM and STF alone, several times more expressions per minute
    grounding_only: bool = False
    max_kept_videos: int = 5000  # grounding_only: the pool's memory bound

    def __post_init__(self):
        self.steps = {int(k): int(v) for k, v in self.steps.items()}
        self.lr = {int(k): float(v) for k, v in self.lr.items()}
        if self.grounding_only and not self.scratch_losses:
            raise ConfigError("grounding_only trains on the grounding loss: it needs the "
                              "scratch losses (--scratch-losses)")
        if self.grounding_only and self.train_videos > self.max_kept_videos:
            raise ConfigError(f"grounding_only keeps every training video's features in "
                              f"memory: {self.train_videos} videos is more than "
                              f"{self.max_kept_videos}; give --train-videos")


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
                 sample_fn: Callable[[int], Sample] = shapes_sample, world: D.World | None = None):
        self.model, self.cfg, self.sample_fn = model, cfg, sample_fn
        self.world = world or D.World()
        self.order = D.SampleOrder(cfg.train_videos, cfg.seed, self.world)
        self.module = model  # what the loop calls: the model, DDP around it, or FSDP2-sharded
        self.out = Path(cfg.out)
        self.ckpt = self.out / "checkpoint"
        self.history: list[dict] = []
        self.losses: list[dict] = []  # this stage's, kept in the checkpoint for the history
        self.position = {"stage_index": 0, "step": 0, "seen": 0}
        self.seconds = 0.0
        self.checks: list[dict] = []  # prompt-following checks of the current stage
        self._views = self._clips = None  # held-out frames and clips of those checks, built once
        self._wrapped_for = None
        self._kept: dict[int, Sample] = {}  # "ground" mode: video index -> its features
        if cfg.lora and any(s in (1, 2, 3) for s in cfg.stages):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)  # the adapters' init, the same on every rank
                apply_lora(model)  # once, before any sharding; merged when written
        if cfg.checkpointing:
            D.checkpoint_blocks(model)

    # ------------------------------------------------------------------ stage set-up
    def _rewrap(self) -> None:
        """(Re)build the DDP wrapper when the trainable set changed (DDP buckets only the
        parameters that train when it is built); FSDP2 shards once, in place."""
        key = tuple(p.requires_grad for p in self.model.parameters())
        if key != self._wrapped_for:
            self.module = D.wrap(self.model, self.cfg.strategy, self.world, bf16=self._bf16())
            self._wrapped_for = key

    def _bf16(self) -> bool:
        device = self.model.device
        return device.type == "cuda" and torch.cuda.is_bf16_supported()

    def _begin_stage(self, stage: int) -> None:
        set_trainable(self.model, STAGES[stage], self.cfg.lora)
        self._rewrap()
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr[stage], weight_decay=0.0)
        self.scheduler = _schedule(self.optimizer, self.cfg.steps[stage], self.cfg.warmup)

    # ------------------------------------------------------------------- checkpoints
    def save(self) -> None:
        """Every rank writes its shards to OUT/.checkpoint.partial, then rank 0 adds the
        trainer state and moves it into place whole."""
        tmp = self.out / ".checkpoint.partial"
        if self.world.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        D.barrier(self.world)
        D.save_checkpoint(tmp / "shards", self.module, self.optimizer)
        if self.world.main:
            torch.save({"position": self.position, "scheduler": self.scheduler.state_dict(),
                        "history": self.history, "losses": self.losses,
                        "seconds": self.seconds,
                        "checks": self.checks, "config": asdict(self.cfg),
                        "world_size": self.world.size}, tmp / "state.pt")
            old = self.out / ".checkpoint.old"
            shutil.rmtree(old, ignore_errors=True)
            if self.ckpt.exists():
                os.replace(self.ckpt, old)
            os.replace(tmp, self.ckpt)
            shutil.rmtree(old, ignore_errors=True)
        D.barrier(self.world)

    def restore(self) -> bool:
        """Continue from OUT/checkpoint (written on any number of ranks); False when
        starting fresh."""
        if not (self.ckpt / "state.pt").is_file():
            return False
        state = torch.load(self.ckpt / "state.pt", weights_only=False)
        self.position, self.history = state["position"], state["history"]
        self.seconds, self.checks = state["seconds"], state.get("checks", [])
        self.losses = state.get("losses", [])
        stage = self.cfg.stages[self.position["stage_index"]]
        self._begin_stage(stage)
        self._freeze_for_step(stage)
        D.load_checkpoint(self.ckpt / "shards", self.module, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        return True

    # ------------------------------------------------------------------------- loop
    def _encoder_frozen(self, stage: int) -> bool:
        return (stage == 0 and not self.position.get("decoder_follows")
                and self.position["step"] < self.cfg.decoder_first)

    def _freeze_for_step(self, stage: int) -> None:
        """Stage 0 trains the decoder on the frozen encoder first."""
        if stage == 0:
            frozen = self._encoder_frozen(stage)
            self.model.sam2.image_encoder.requires_grad_(not frozen)
            self._rewrap()

    def _plan_step(self, stage: int) -> tuple[int, str | None]:
        """(global samples, forced mode) of this optimizer step."""
        if stage != 0:
            return self.cfg.accumulate, None
        step, every = self.position["step"], self.cfg.propagate_every
        propagating = (not self._encoder_frozen(stage) and every > 0
                       and step % every == every - 1)
        if propagating:
            return self.cfg.accumulate, "click_propagate"
        return self.cfg.click_videos, "clicks"

    def _mode(self, stage: int, forced: str | None) -> str:
        if forced:
            return forced
        if stage == 1 and self.cfg.grounding_only:
            return "ground"
        return STAGES[stage].mode_for(self.position["step"], self.cfg.points_every,
                                      self.model.config.frames_per_anchor)

    def _sample(self, index: int, mode: str) -> Sample:
        """The training video; in "ground" mode its frozen encoders' features, computed
        on its first use and kept (not its frames)."""
        if mode != "ground":
            return self.sample_fn(index)
        if index not in self._kept:
            sample = self.sample_fn(index)
            # an empty array of its own: a view (frames[:0]) would keep every frame alive
            empty = np.empty((0, *sample.frames.shape[1:]), sample.frames.dtype)
            self._kept[index] = Sample(empty, sample.texts, [], sample.seed,
                                       features=ground_features(self.model, sample))
        return self._kept[index]

    def _step(self, stage: int) -> dict[str, float]:
        self.module.train()
        logged: dict[str, float] = {}
        device = self.model.device
        self._freeze_for_step(stage)
        count, forced = self._plan_step(stage)
        start, world = self.position["seen"], self.world
        mine = [self.cfg.first_video + i for i in self.order.mine(start, count)]
        mode = self._mode(stage, forced)
        for i, index in enumerate(mine):
            sample = self._sample(index, mode)
            torch.manual_seed(self.cfg.seed * 1_000_003 + index)  # this sample's dropout
            with D.gradient_sync(self.module, i == len(mine) - 1), torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=self._bf16()):
                parts = self.module(sample, mode, self.cfg.scratch_losses)
                loss = total(parts) / len(mine)
                loss.backward()
            for k, v in parts.items():
                logged[k] = logged.get(k, 0.0) + v.item() / len(mine)
            logged["loss"] = logged.get("loss", 0.0) + loss.item()
        self.position["seen"] += count
        params = [p for p in self.module.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return D.mean_over_ranks(logged, world)

    # ---------------------------------------------------------------- whole models
    def plain_model(self) -> VirstModel | None:
        """The model as one plain module with LoRA merged (rank 0; None elsewhere): what
        validation reads and what is written out. Gathering runs on every rank."""
        state = (D.full_state(self.module) if self.world.distributed else
                 {k: v.detach().clone() for k, v in self.model.state_dict().items()})
        if not self.world.main:
            return None
        state = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in state.items()}
        if self.cfg.lora:
            state, _ = merge_lora(state, LORA_ALPHA)
        model = VirstModel(self.model.config, self.model.tokenizer)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        load_checked(model, state, "training state")
        return model.to(self.model.device).eval()

    # --------------------------------------------------------------- prompt following
    def _check_prompts(self, stage: int, bar) -> dict | None:
        """Click and tracking IoU and agreement on held-out frames and clips (rank 0
        measures, all ranks get it)."""
        if self.cfg.check_videos <= 0:
            return None
        model = self.plain_model()
        result = None
        if self.world.main:
            size, videos = self.model.config.sam_image_size, self.cfg.check_videos
            if self._views is None:
                self._views = shapes_views(videos, size=size)
            if self._clips is None:
                self._clips = shapes_clips(videos, self.cfg.check_frames, size=size)
            result = {"stage": stage, "step": self.position["step"],
                      **click_following(model, self._views),
                      **track_following(model, self._clips)}
            bar.write(f"stage {stage} step {result['step']}: click IoU "
                      f"{result['click_iou']:.3f}, agreement between clicks on different "
                      f"objects {result['click_agreement']:.3f}; tracked frames: IoU "
                      f"{result['track_iou']:.3f}, agreement {result['track_agreement']:.3f}")
        return D.from_main(result, self.world)

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
                       desc=f"stage {stage} ({STAGES[stage].name})",
                       disable=not self.world.main)
            while self.position["step"] < total_steps:
                start = time.perf_counter()
                logged = self._step(stage)
                self.seconds += time.perf_counter() - start
                self.losses.append(logged)
                self.position["step"] += 1
                done_now += 1
                bar.update()
                shown = "dice" if "dice" in logged else "grounding"
                bar.set_postfix({"loss": f"{logged['loss']:.3f}",
                                 shown: f"{logged.get(shown, 0.0):.3f}"})
                if (self.cfg.check_every and "sam_heads" in STAGES[stage].groups
                        and self.position["step"] % self.cfg.check_every == 0
                        and self.position["step"] < total_steps):
                    check = self._check_prompts(stage, bar)
                    self.checks.append(check)
                    if check and check["click_agreement"] < self.cfg.follows_agreement:
                        self.position["decoder_follows"] = True  # the encoder may train now
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
            ground = stage == 1 and self.cfg.grounding_only
            name = STAGES[stage].name + (" (grounding only)" if ground else "")
            record = {"stage": stage, "name": name, "steps": total_steps,
                      "final_losses": _mean(self.losses[-20:]), "train_seconds": self.seconds,
                      "loss_curve": [round(x["loss"], 4) for x in self.losses],
                      "prompt_following": [c for c in [*self.checks, final_check] if c]}
            self.checks, self.losses = [], []
            self._kept.clear()
            if validate is not None and self.cfg.eval_videos > 0:
                plain = self.plain_model()
                if self.world.main:
                    record["validation"] = validate(plain, stage)
                D.barrier(self.world)
            self.history.append(record)
            self.position = {"stage_index": self.position["stage_index"] + 1, "step": 0,
                             "seen": self.position["seen"],
                             "decoder_follows": self.position.get("decoder_follows", False)}
            if self.position["stage_index"] < len(self.cfg.stages):
                self._begin_stage(self.cfg.stages[self.position["stage_index"]])
                resumed = True
                self.save()
        final = self.plain_model()
        if self.world.main:
            (self.out / "history.json").write_text(json.dumps(self.history, indent=2) + "\n")
            final.save_pretrained(self.out / "model")
        D.barrier(self.world)


def _mean(rows: list[dict]) -> dict[str, float]:
    """Per loss, the mean over the rows that have it (click steps have no expression
    losses)."""
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
