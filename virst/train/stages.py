"""The progressive schedule: which parameters train in which stage, and LoRA on Qwen2.

Paper (section "Three-stage progressive training"):
  1 align      SAM2 frozen; STF and the LLM's LoRA adapters train;
  2 segment    + SAM2's mask decoder and memory modules, per-frame (image-level) masks;
  3 propagate  everything, with anchor-based propagation (with an anchor on every
               segmentation frame: every one from its own prompt).
Stage 0 is ours: the tiny preset has no pretrained SAM2 to start from, so it first trains
SAM2 alone the way SAM2 itself is trained, in miniature: clicks on random objects with
corrective clicks on the error region, and propagation from clicked frames, until the mask
decoder follows its prompt. Only then can the STF and LLM stages teach it the expression
(a decoder trained from scratch on expression prompts learns "mask every salient object"
and ignores its prompt for good: DESIGN.md section 7).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from virst.model import VirstModel

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK, LORA_ALPHA = 64, 16.0


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    groups: tuple[str, ...]
    mode: str  # "anchors", "propagate" or "clicks" (see train/step.py)

    def mode_for(self, step: int, points_every: int = 0, frames_per_anchor: int = 4) -> str:
        """The forward mode of one optimizer step (every sample of a step, on every rank,
        runs the same modules): stages that train SAM2's heads keep its click training on
        every `points_every`-th step (0: never), so that the decoder keeps following its
        prompt. A model that anchors every segmentation frame (`frames_per_anchor` 1)
        reaches none of them by propagation, so its stage 3 trains every one from its own
        prompt, as it runs. (Stage 0's own schedule is the trainer's.)"""
        if points_every and "sam_heads" in self.groups and step % points_every == 0:
            return "clicks"
        if self.mode == "propagate" and frames_per_anchor == 1:
            return "anchors"
        return self.mode


STAGES = {
    0: Stage(0, "prompt following", ("sam_heads", "sam_encoder"), "clicks"),
    1: Stage(1, "align", ("stf", "llm"), "anchors"),
    2: Stage(2, "segment", ("stf", "llm", "sam_heads"), "anchors"),
    3: Stage(3, "propagate", ("stf", "llm", "sam_heads", "sam_encoder", "vision"), "propagate"),
}


def parameter_groups(model: VirstModel) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter in exactly one named group."""
    prefixes = {
        "stf": ["seg_prompter.", "initial_seg_fusion."],
        "llm": ["vlm.llm.", "vlm.lm_head."],
        "sam_encoder": ["sam2.image_encoder."],
        "vision": ["vlm.vision_tower.", "vlm.mm_projector."],
    }
    groups: dict[str, list] = {name: [] for name in (*prefixes, "sam_heads")}
    for name, param in model.named_parameters():
        group = next((g for g, ps in prefixes.items() if any(name.startswith(p) for p in ps)),
                     "sam_heads")  # mask decoder, prompt encoder, memory modules, pointers
        groups[group].append((name, param))
    assert all(n.startswith("sam2.") for n, _ in groups["sam_heads"]), "unassigned parameter"
    return groups


def apply_lora(model: VirstModel, r: int = LORA_RANK, alpha: float = LORA_ALPHA,
               dropout: float = 0.05) -> None:
    """Wrap the Qwen2 decoder's projections in LoRA adapters (peft), base weights frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=LORA_TARGETS, bias="none")
    model.vlm.llm = get_peft_model(model.vlm.llm, config)


def set_trainable(model: VirstModel, stage: Stage, lora: bool) -> list[str]:
    """Freeze everything but the stage's groups; returns the names of trainable parameters.

    With LoRA the LLM group means the adapters only (and the lm_head stays frozen)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for group, params in parameter_groups(model).items():
        if group not in stage.groups:
            continue
        for name, p in params:
            if group == "llm" and lora and "lora_" not in name:
                continue
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]
