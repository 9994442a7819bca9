"""`virst train --plan --preset virst-7b --nproc 8`: per-rank memory of stage 3 (the most
expensive: everything trains, propagation over the segmentation frames) for DDP and FSDP2,
with and without LoRA, against the GPU's memory. Parameter counts come from the model
built on the meta device; activations from the sizes of its transformer blocks.

Assumptions (printed with the table): fp32 master parameters, bf16 compute (autocast or
FSDP2's MixedPrecisionPolicy), fp32 gradients for trainable parameters, AdamW (two fp32
states per trainable parameter); activations of one sample per rank (the release's micro
batch) in bf16 with SDPA (no attention-score matrices), ~34 bytes x tokens x width per
block without checkpointing, the block inputs plus one block's worth with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from virst.config import preset
from virst.model import VirstModel, init_empty_weights
from virst.train.stages import LORA_RANK, LORA_TARGETS, parameter_groups

GB = 1024**3
ANSWER_TOKENS = 64  # the assistant's answer with its [SEG] tokens
TEXT_TOKENS = 113  # assumed: chat template, instruction and expression around the video


@dataclass
class Block:
    name: str
    count: int
    tokens: int  # per sample, all frames / clips together
    width: int
    params: int  # one block


def lora_params(model: VirstModel) -> int:
    """r x (in + out) for every LoRA target Linear of the Qwen2 decoder."""
    total = 0
    for name, module in model.vlm.llm.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS:
            total += LORA_RANK * (module.in_features + module.out_features)
    return total


def activation_blocks(model: VirstModel) -> list[Block]:
    cfg = model.config
    llm_tokens = TEXT_TOKENS + cfg.tokens_per_frame * cfg.max_vlm_frames + ANSWER_TOKENS
    clips = cfg.max_vlm_frames // cfg.clip_frames
    umt_tokens = clips * cfg.clip_frames * cfg.umt_grid**2
    out = [Block("Qwen2 layers", cfg.llm_layers, llm_tokens, cfg.llm_hidden,
                 _params(model.vlm.llm.layers[0])),
           Block("UMT blocks", cfg.umt_depth, umt_tokens, cfg.umt_width,
                 _params(model.vlm.vision_tower.blocks[0]))]
    side = cfg.sam_image_size // 4  # Hiera patch stride 4
    for stage, depth in enumerate(cfg.hiera_stages):
        width = cfg.hiera_embed_dim * 2**stage
        tokens = cfg.max_seg_frames * (side // 2**stage) ** 2
        first = sum(cfg.hiera_stages[:stage])
        out.append(Block(f"Hiera stage {stage + 1}", depth, tokens, width,
                         _params(model.sam2.image_encoder.trunk.blocks[first + depth - 1])))
    return out


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def activations(blocks: list[Block], checkpointing: bool) -> float:
    """Bytes of saved activations for one sample."""
    if not checkpointing:
        return sum(34 * b.count * b.tokens * b.width for b in blocks)
    stored = sum(2 * b.count * b.tokens * b.width for b in blocks)
    return stored + max(34 * b.tokens * b.width for b in blocks)


def memory_plan(preset_name: str = "virst-7b", nproc: int = 8, gpu_gb: float = 80) -> str:
    with init_empty_weights():
        model = VirstModel(preset(preset_name))
    groups = {g: sum(p.numel() for _, p in ps) for g, ps in parameter_groups(model).items()}
    total = sum(groups.values())
    lora = lora_params(model)
    blocks = activation_blocks(model)
    largest_unit = max(b.params for b in blocks)
    in_blocks = sum(b.count * b.params for b in blocks)
    root = total - in_blocks  # embeddings, lm_head, SAM2 heads, STF, projector: FSDP2's root
    rows = []
    for use_lora in (True, False):
        trainable = total - groups["llm"] + lora if use_lora else total
        params = total + (lora if use_lora else 0)
        states = 4 * trainable + 8 * trainable  # fp32 grads + AdamW's two moments
        for strategy, ckpt in (("DDP", False), ("DDP", True), ("FSDP2", True)):
            act = activations(blocks, ckpt)
            if strategy == "DDP":
                resident = 4 * params + states
            else:  # shards, plus whole bf16 copies of the root and two blocks in flight
                resident = (4 * params + states) / nproc + 2 * root + 2 * 2 * largest_unit
            need = (resident + act) / GB
            rows.append((strategy, use_lora, ckpt, trainable, resident / GB, act / GB, need))
    lines = [f"memory plan, {preset_name} stage 3 (everything trains), {nproc} ranks of "
             f"{gpu_gb:.0f} GB, one sample per rank",
             f"parameters {total / 1e9:.2f} B (LLM {groups['llm'] / 1e9:.2f} B, UMT + "
             f"projector {groups['vision'] / 1e9:.2f} B, SAM2 encoder "
             f"{groups['sam_encoder'] / 1e9:.2f} B, SAM2 heads {groups['sam_heads'] / 1e9:.3f} "
             f"B, STF {groups['stf'] / 1e9:.3f} B); LoRA r={LORA_RANK} adds {lora / 1e6:.0f} M",
             f"{'strategy':<9}{'LoRA':<6}{'act. ckpt':<11}{'trainable':>11}"
             f"{'params+grads+Adam':>19}{'activations':>13}{'per rank':>10}  verdict"]
    for strategy, use_lora, ckpt, trainable, resident, act, need in rows:
        margin = gpu_gb - need
        verdict = (f"fits, {margin:.0f} GB to spare" if margin >= 0
                   else f"does not fit: {-margin:.0f} GB over")
        lines.append(f"{strategy:<9}{'yes' if use_lora else 'no':<6}{'yes' if ckpt else 'no':<11}"
                     f"{trainable / 1e9:10.2f}B{resident:17.1f} GB{act:11.1f} GB"
                     f"{need:8.1f} GB  {verdict}")
    lines += [
        "activations per sample: " + ", ".join(
            f"{b.name} {b.count} x {b.tokens} tokens x {b.width}" for b in blocks),
        "assumptions: fp32 master weights, bf16 compute, fp32 gradients and AdamW states for "
        "trainable parameters; activations ~34 B x tokens x width per block (bf16, SDPA), "
        "with checkpointing the block inputs plus one block; FSDP2 also holds bf16 copies of "
        "the root parameters (embeddings, lm_head, heads) and two blocks in flight. CUDA "
        "context, allocator fragmentation and NCCL buffers (a few GB) are not counted.",
        "the release trained on 8 x H100 (80 GB) for 3 days with DeepSpeed and LoRA: the "
        "FSDP2 + LoRA row is that setting in PyTorch's own stack."]
    return "\n".join(lines)
