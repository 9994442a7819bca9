"""Export units: one `nn.Module` per deployable piece, at the natural boundaries of
DESIGN.md section 4. All memory-bank state stays outside, in the runtime.

Each wrapper reuses the model's own weights and the reference code path, with two
export-only rewrites made on private copies: SAM2's complex-number RoPE becomes the
equal real cos/sin form, and its hand-written LayerNorm2d a real layer norm.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from sam2.modeling.sam.transformer import RoPEAttention
from sam2.modeling.sam2_utils import LayerNorm2d
from torch import nn

from virst.model import VirstModel
from virst.stf import rotate_pairs, stf_prompts
from virst.tdau import decode_masks, dense_pe, no_prompt_tokens

# ------------------------------------------------------------------ export rewrites


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of (B, C, H, W): one LayerNormalization node."""

    def __init__(self, src: LayerNorm2d):
        super().__init__()
        self.weight, self.bias, self.eps = src.weight, src.bias, src.eps

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def with_real_layernorm(module: nn.Module) -> nn.Module:
    """A copy of `module` whose LayerNorm2d layers are ChannelLayerNorm (same weights)."""
    module = copy.deepcopy(module)
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, LayerNorm2d):
                setattr(child, attr, ChannelLayerNorm(sub))
    return module


def sam_sharing_weights(sam: nn.Module) -> nn.Module:
    """A shallow copy of SAM2 (the same weights) whose submodules a unit may replace:
    `copy.copy` alone shares the module dict, and replacing the copy's decoder replaced
    the caller's model's."""
    twin = copy.copy(sam)
    twin._modules = dict(sam._modules)
    return twin


def rope_tables(attn: RoPEAttention, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (tokens, head_dim) of SAM2's axial RoPE, from its own complex table."""
    side = int(math.isqrt(tokens))
    cis = attn.compute_cis(end_x=side, end_y=side)
    return cis.real.repeat_interleave(2, dim=-1), cis.imag.repeat_interleave(2, dim=-1)


def rope_attention(attn: RoPEAttention, q, k, v, cos, sin, num_k_exclude_rope):
    """SAM2's RoPEAttention with real arithmetic: x * cos + rotate_pairs(x) * sin."""
    q, k, v = attn.q_proj(q), attn.k_proj(k), attn.v_proj(v)
    q, k, v = (attn._separate_heads(x, attn.num_heads) for x in (q, k, v))
    q = q * cos + rotate_pairs(q) * sin
    n_rope = k.shape[-2] - num_k_exclude_rope
    reps = n_rope // cos.shape[0]
    k_cos, k_sin = cos.repeat(reps, 1), sin.repeat(reps, 1)
    k_rot = k[:, :, :n_rope] * k_cos + rotate_pairs(k[:, :, :n_rope]) * k_sin
    k = torch.cat([k_rot, k[:, :, n_rope:]], dim=2)
    return q, k, v


# ---------------------------------------------------------------------------- units


@dataclass
class Unit:
    """A wrapper, the names of its inputs and outputs, example inputs and dynamic axes."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    fp32_inputs: tuple[str, ...] = ()  # kept in fp32 whatever the precision
    fp32_outputs: tuple[str, ...] = ()


class ImageEncoder(nn.Module):
    """Pixels (B, 3, S, S) -> level-2 features and the decoder's projected hi-res maps."""

    def __init__(self, model: VirstModel):
        super().__init__()
        self.sam = model.sam2

    def forward(self, pixels):
        fpn = self.sam.forward_image(pixels)["backbone_fpn"]
        # SAM2's FPN upsamples in fp32, so a bf16/fp16 model's level 2 comes out fp32
        return fpn[2].to(pixels.dtype), fpn[0], fpn[1]


class MaskDecoder(nn.Module):
    """SAM2 mask head with best-of-3 pick, occlusion handling and the pointer MLP.

    `anchor=True`: input features are raw level-2 maps (+ no_mem_embed inside), the 10 STF
    tokens are the sparse prompt. `anchor=False`: memory-conditioned features and SAM2's
    constant no-prompt tokens, baked in.
    """

    def __init__(self, model: VirstModel, anchor: bool):
        super().__init__()
        self.anchor = anchor
        self.sam = sam_sharing_weights(model.sam2)  # own decoder copy below
        self.sam.sam_mask_decoder = with_real_layernorm(model.sam2.sam_mask_decoder)
        if not anchor:
            with torch.no_grad():
                self.register_buffer("no_prompt", no_prompt_tokens(model.sam2))
        # a bf16/fp16 model's grid encoding is made once in fp32 (not traceable per call)
        low = model.sam2.no_mem_embed.dtype != torch.float32
        self.register_buffer("image_pe", dense_pe(model.sam2) if low else None)

    def forward(self, features, high_res0, high_res1, prompt=None):
        if self.anchor:
            features = features + self.sam.no_mem_embed.reshape(1, -1, 1, 1)
        sparse = prompt if self.anchor else self.no_prompt.expand(features.shape[0], -1, -1)
        head = decode_masks(self.sam, features, [high_res0, high_res1], sparse, self.image_pe)
        return head.low_res, head.ious, head.obj_score, head.obj_ptr


class MemoryAttention(nn.Module):
    """Current level-2 features (B, C, h, w) attend to spatial memories (B, S, Cm) and
    object-pointer tokens (B, P, Cm); S = k * h * w for any k. `padded=True`: fixed
    S_max and P_max with validity masks instead (for engines without dynamic shapes; masks
    None: every entry is real)."""

    def __init__(self, model: VirstModel, padded: bool = False):
        super().__init__()
        sam, cfg = model.sam2, model.config
        self.attn = sam.memory_attention
        self.padded = padded
        hw = cfg.sam_feat_size**2
        cos, sin = rope_tables(self.attn.layers[0].self_attn, hw)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        # the level-2 positional encoding is the same for every frame: a constant. Made on
        # the model's device: SAM2 caches it there by size, and the image encoder reads it
        # (a host copy would be a blocking copy on every call on a GPU)
        pos = sam.image_encoder.neck.position_encoding(torch.zeros(
            1, cfg.sam_dim, cfg.sam_feat_size, cfg.sam_feat_size, device=sam.no_mem_embed.device))
        self.register_buffer("curr_pos", pos.flatten(2).transpose(1, 2))

    def _layer(self, layer, x, memory, memory_pos, n_ptr, mask):
        y = layer.norm1(x)
        q, k, v = rope_attention(layer.self_attn, y, y, y, self.cos, self.sin, 0)
        x = x + layer.self_attn.out_proj(layer.self_attn._recombine_heads(
            F.scaled_dot_product_attention(q, k, v)))
        y = layer.norm2(x)
        attn = layer.cross_attn_image
        q, k, v = rope_attention(attn, y, memory + memory_pos, memory, self.cos, self.sin, n_ptr)
        x = x + attn.out_proj(attn._recombine_heads(
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
        y = layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        return x + y

    def forward(self, features, memory, memory_pos, pointers, pointer_pos,
                memory_valid=None, pointer_valid=None):
        b, c, h, w = features.shape
        x = features.flatten(2).transpose(1, 2) + 0.1 * self.curr_pos.to(features.dtype)
        mem = torch.cat([memory, pointers], dim=1)
        pos = torch.cat([memory_pos, pointer_pos], dim=1)
        mask = None
        if self.padded and memory_valid is not None:
            frames = memory_valid.repeat_interleave(h * w, dim=1)
            keep = torch.cat([frames, pointer_valid], dim=1) > 0.5
            # a full (B, 1, q, k) mask: ONNX Runtime's Attention does not broadcast q
            mask = keep[:, None, None, :].expand(b, 1, h * w, keep.shape[1])
        n_ptr = pointers.shape[1]
        for layer in self.attn.layers:
            x = self._layer(layer, x, mem, pos, n_ptr, mask)
        return self.attn.norm(x).transpose(1, 2).reshape(b, c, h, w)


class MemoryEncoder(nn.Module):
    """Level-2 features + the chosen low-res mask logits (upsampled inside) + object
    score -> the frame's spatial memory (B, Cm, h, w)."""

    def __init__(self, model: VirstModel):
        super().__init__()
        self.sam = sam_sharing_weights(model.sam2)
        self.sam.memory_encoder = with_real_layernorm(model.sam2.memory_encoder)

    def forward(self, features, mask_logits, obj_score):
        size = self.sam.image_size
        high = F.interpolate(mask_logits, size=(size, size), mode="bilinear",
                             align_corners=False).to(features.dtype)  # fp32 masks
        flat = [features.flatten(2).permute(2, 0, 1)]
        maskmem, _ = self.sam._encode_new_memory(
            current_vision_feats=flat, feat_sizes=[tuple(features.shape[-2:])],
            pred_masks_high_res=high, object_score_logits=obj_score, is_mask_from_pts=False)
        return maskmem


class TrackStep(nn.Module):
    """A whole propagated frame in one call, at fixed shapes so that one graph (engine,
    CUDA graph) serves every frame: memory attention over `S` spatial memory slots and
    `P` object pointers with validity masks, the mask head with SAM2's no-prompt tokens,
    the memory encoder. Inputs per object b:

      memory (B, S, h*w, Cm)   spatial memories; memory_tpos (B, S, Cm) their temporal
                               encodings (added to the constant spatial one inside)
      pointers (B, P, C)       object pointers, split into C / Cm tokens inside;
                               pointer_pos (B, P, Cm) their signed temporal encodings
      memory_valid (B, S), pointer_valid (B, P)   1 for real entries, 0 for padding; both
                               None for memory of real entries only (any S and P; the
                               torch backends: no attention mask, the faster kernels)
    """

    def __init__(self, model: VirstModel):
        super().__init__()
        cfg = model.config
        self.attention = MemoryAttention(model, padded=True)
        self.decoder = MaskDecoder(model, anchor=False)
        self.memory = MemoryEncoder(model)
        self.split = cfg.sam_dim // cfg.mem_dim
        f = cfg.sam_feat_size
        # on the model's device: SAM2 caches it by size for the memory encoder above, whose
        # every call would copy a host tensor (on a GPU: a blocking copy, and no CUDA graph)
        pos = model.sam2.memory_encoder.position_encoding(
            torch.zeros(1, cfg.mem_dim, f, f, device=model.sam2.no_mem_embed.device))
        self.register_buffer("maskmem_pos", pos.flatten(2).transpose(1, 2)[0])  # (hw, Cm)

    def forward(self, features, high_res0, high_res1, memory, memory_tpos, memory_valid,
                pointers, pointer_pos, pointer_valid):
        b, s, hw, cm = memory.shape
        pos = (self.maskmem_pos[None, None] + memory_tpos[:, :, None]).reshape(b, s * hw, cm)
        p = pointers.shape[1]
        # SAM2 splits each C-d pointer into C / Cm tokens, each with the pointer's encoding
        ptr_tokens = pointers.reshape(b, p * self.split, cm)
        ptr_pos = pointer_pos.repeat_interleave(self.split, dim=1)
        ptr_valid = (None if pointer_valid is None
                     else pointer_valid.repeat_interleave(self.split, dim=1))
        conditioned = self.attention(features, memory.reshape(b, s * hw, cm), pos, ptr_tokens,
                                     ptr_pos, memory_valid, ptr_valid)
        logits, ious, score, ptr = self.decoder(conditioned, high_res0, high_res1)
        return logits, ious, score, ptr, self.memory(features, logits, score)


class SegPrompterUnit(nn.Module):
    """[SEG] states + segmentation-frame features -> (1, P, T, C) anchor prompts."""

    def __init__(self, model: VirstModel):
        super().__init__()
        self.prompter = model.seg_prompter
        self.clicks = model.sam2.sam_prompt_encoder if model.config.stf_point_prompt else None
        self.click_power = model.config.stf_click_power

    def forward(self, seg_hidden, seg_features):
        return stf_prompts(self.prompter, seg_hidden, seg_features, self.clicks,
                           click_power=self.click_power)


class VisionUnit(nn.Module):
    """UMT clip encoder + ToMe projector: (clips, 4, 3, H, W) -> (clips * 64, hidden)."""

    def __init__(self, model: VirstModel):
        super().__init__()
        self.vlm = model.vlm

    def forward(self, clips):
        return self.vlm.mm_projector(self.vlm.vision_tower(clips))


# ----------------------------------------------------------------------- unit table

STEP_OUTPUTS = ("mask_logits", "ious", "obj_score", "obj_ptr", "maskmem")
STEP_FP32 = ("mask_logits", "ious", "obj_score")
TRACK_INPUTS = ("features", "high_res0", "high_res1", "memory", "memory_tpos", "memory_valid",
                "pointers", "pointer_pos", "pointer_valid")


def track_inputs(cfg, rnd, batch: int, feats: dict) -> dict:
    """Example `TrackStep` inputs at the config's fixed memory bounds, some slots padding."""
    s, p = cfg.max_memory_frames, cfg.max_pointer_frames
    hw, cm = cfg.sam_feat_size**2, cfg.mem_dim
    return {**feats, "memory": rnd(batch, s, hw, cm), "memory_tpos": rnd(batch, s, cm),
            "memory_valid": (torch.arange(s) < s - 2).float().expand(batch, s).contiguous(),
            "pointers": rnd(batch, p, cfg.sam_dim), "pointer_pos": rnd(batch, p, cm),
            "pointer_valid": (torch.arange(p) < p - 3).float().expand(batch, p).contiguous()}



def build_units(model: VirstModel, names=None, batch: int = 2, memory_frames: int = 3,
                pointers: int = 5, seg_frames: int = 6) -> list[Unit]:
    """Every export unit of `model` with example inputs (random, seeded)."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    c, cm, f = cfg.sam_dim, cfg.mem_dim, cfg.sam_feat_size
    hw, split = f * f, cfg.sam_dim // cfg.mem_dim
    feats = dict(features=rnd(batch, c, f, f), high_res0=rnd(batch, c // 8, 4 * f, 4 * f),
                 high_res1=rnd(batch, c // 4, 2 * f, 2 * f))
    mem = dict(features=rnd(1, c, f, f), memory=rnd(1, memory_frames * hw, cm),
               memory_pos=rnd(1, memory_frames * hw, cm),
               pointers=rnd(1, pointers * split, cm), pointer_pos=rnd(1, pointers * split, cm))
    max_frames, max_ptr = cfg.max_memory_frames, cfg.max_pointer_frames * split
    padded = dict(features=mem["features"], memory=rnd(1, max_frames * hw, cm),
                  memory_pos=rnd(1, max_frames * hw, cm), pointers=rnd(1, max_ptr, cm),
                  pointer_pos=rnd(1, max_ptr, cm),
                  memory_valid=(torch.arange(max_frames) < memory_frames).float()[None],
                  pointer_valid=(torch.arange(max_ptr) < pointers * split).float()[None])
    clip = cfg.clip_frames
    units = {
        "image_encoder": lambda: Unit(
            "image_encoder", ImageEncoder(model),
            {"pixels": rnd(batch, 3, cfg.sam_image_size, cfg.sam_image_size)},
            ["features", "high_res0", "high_res1"],
            {"pixels": {0: "batch"}}),
        "mask_decoder_anchor": lambda: Unit(
            "mask_decoder_anchor", MaskDecoder(model, anchor=True),
            {**feats, "prompt": rnd(batch, cfg.prompt_tokens, c)},
            ["mask_logits", "ious", "obj_score", "obj_ptr"],
            {k: {0: "batch"} for k in (*feats, "prompt")},
            fp32_outputs=("mask_logits", "ious", "obj_score")),
        "mask_decoder_track": lambda: Unit(
            "mask_decoder_track", MaskDecoder(model, anchor=False), dict(feats),
            ["mask_logits", "ious", "obj_score", "obj_ptr"], {k: {0: "batch"} for k in feats},
            fp32_outputs=("mask_logits", "ious", "obj_score")),
        "memory_attention": lambda: Unit(
            "memory_attention", MemoryAttention(model), mem, ["features_with_memory"],
            {"memory": {1: "memory_tokens"}, "memory_pos": {1: "memory_tokens"},
             "pointers": {1: "pointer_tokens"}, "pointer_pos": {1: "pointer_tokens"}}),
        "memory_attention_padded": lambda: Unit(
            "memory_attention_padded", MemoryAttention(model, padded=True), padded,
            ["features_with_memory"], fp32_inputs=("memory_valid", "pointer_valid")),
        "memory_encoder": lambda: Unit(
            "memory_encoder", MemoryEncoder(model),
            {"features": rnd(batch, c, f, f), "mask_logits": rnd(batch, 1, 4 * f, 4 * f) * 5,
             "obj_score": rnd(batch, 1)},
            ["maskmem"], {k: {0: "batch"} for k in ("features", "mask_logits", "obj_score")},
            fp32_inputs=("mask_logits", "obj_score")),
        "track_step": lambda: Unit(
            "track_step", TrackStep(model), track_inputs(cfg, rnd, batch, feats),
            [*STEP_OUTPUTS], {k: {0: "objects"} for k in TRACK_INPUTS},
            fp32_inputs=("memory_valid", "pointer_valid"), fp32_outputs=STEP_FP32),
        "seg_prompter": lambda: Unit(
            "seg_prompter", SegPrompterUnit(model),
            {"seg_hidden": rnd(1, cfg.num_seg_tokens, cfg.llm_hidden),
             "seg_features": rnd(1, seg_frames, c, f, f)},
            ["prompts"], {"seg_features": {1: "seg_frames"}}),
        "vision": lambda: Unit(
            "vision", VisionUnit(model),
            {"clips": rnd(2, clip, 3, cfg.vlm_image_size, cfg.vlm_image_size)},
            ["video_tokens"], {"clips": {0: "clips"}}),
    }
    names = list(units) if names is None else names
    unknown = sorted(set(names) - set(units))
    if unknown:
        raise ValueError(f"unknown export units {unknown}; choose from {list(units)}")
    return [units[n]() for n in names]


UNIT_NAMES = ("image_encoder", "mask_decoder_anchor", "mask_decoder_track", "memory_attention",
              "memory_attention_padded", "memory_encoder", "track_step",
              "seg_prompter", "vision")

