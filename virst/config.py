"""One configuration type for every VIRST size; presets differ only in the numbers.

`virst-7b` carries every dimension of the released model (DESIGN.md section 1);
`tiny` keeps the same architecture with sizes a 2-core CPU runs in seconds.
No module hard-codes a size: everything below is read from here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from virst.errors import ConfigError


@dataclass(frozen=True)
class VirstConfig:
    preset: str = "virst-7b"

    # --- UMT video tower (VideoChat-Flash "umt-hd-large", select layer -2) ---
    vlm_image_size: int = 448
    vlm_patch_size: int = 16
    clip_frames: int = 4  # frames per UMT clip (mm_local_num_frames)
    umt_width: int = 1024
    umt_depth: int = 23  # 24-block UMT-L read at layer -2
    umt_heads: int = 16
    umt_mlp: int = 4096
    umt_pos_grid: int = 14  # sinusoid table grid of the pretraining resolution, resized to ours
    tokens_per_frame: int = 16  # ToMe keeps 16 tokens per frame (64 per 4-frame clip)

    # --- Qwen2 language model ---
    llm_hidden: int = 3584
    llm_layers: int = 28
    llm_heads: int = 28
    llm_kv_heads: int = 4
    llm_ffn: int = 18944
    llm_rms_eps: float = 1e-6
    llm_rope_theta: float = 1e6
    llm_max_positions: int = 32768
    vocab_size: int = 151647  # Qwen2 tokenizer + [SEG]
    seg_token_id: int = 151646
    num_seg_tokens: int = 10

    # --- SAM2.1 (Hiera + FPN neck, memory attention, memory encoder) ---
    sam_image_size: int = 1024
    hiera_embed_dim: int = 144
    hiera_heads: int = 2
    hiera_stages: tuple[int, ...] = (2, 6, 36, 4)
    hiera_global_blocks: tuple[int, ...] = (23, 33, 43)
    hiera_window_spec: tuple[int, ...] = (8, 4, 16, 8)
    hiera_pos_bkg: tuple[int, int] = (7, 7)
    sam_dim: int = 256
    # SAM2 hard-codes 8 heads (16 lanes each in the decoder's half-width cross-attention);
    # smaller sam_dim must keep 16 lanes per head or the decoder never learns to locate its
    # prompt (DESIGN.md section 7). A model folder without the field is an 8-head model.
    sam_decoder_heads: int = 8
    mem_dim: int = 64
    mem_attn_layers: int = 4
    mem_attn_ffn: int = 2048
    mem_fuser_layers: int = 2
    num_maskmem: int = 7  # 1 current + 6 previous frames
    max_anchors_in_attn: int = 3  # closest conditioning (anchor) frames attended
    max_obj_ptrs: int = 16  # current + 15 previous frames' object pointers
    memory_bf16_storage: bool = True  # SAM2's video predictor stores memory features in bf16

    # --- STF ---
    stf_grid: int = 8
    stf_heads: int = 8
    stf_layers: int = 2
    stf_max_frames: int = 100
    initial_seg_fusion: bool = False  # stage-1 fusion, off in the official evaluation
    # ours, for models trained from scratch (tiny): the prompt is a click where STF's last
    # cross-attention peaks in the frame instead of STF's 10 tokens (stf.stf_prompts).
    # Off: the release's architecture; a model folder without the field is off.
    stf_point_prompt: bool = False
    # ours, tiny-only: STF's keys also carry each grid cell's change between the neighbouring
    # segmentation frames, so that look-alikes that differ only by motion ("the circle that
    # stops moving") differ in the keys (stf.frame_motion). Off: the release; old folders.
    stf_motion_keys: bool = False
    # ours, with `stf_point_prompt`: the click is the centre of the 3 x 3 cells around the
    # attention peak weighted by attention ** this power (stf.attention_points). 1 (the
    # presets; folders written before the field): the plain weighting; below 1 the peak's
    # neighbours count more (the embedded model: 0.5; MODEL_CARD.md, "Where the click goes").
    stf_click_power: float = 1.0
    fusion_heads: int = 8

    # --- frame sampling and preprocessing ---
    max_vlm_frames: int = 64
    min_vlm_frames: int = 8
    max_seg_frames: int = 32
    frames_per_anchor: int = 4  # K = max(1, T_seg // 4)
    sam_resize: str = "bicubic"  # one resize kernel for SAM2 frames (official mixes two)
    vlm_resize: str = "bicubic"

    extra: dict = field(default_factory=dict, compare=False)

    # ---- derived sizes ----
    @property
    def umt_grid(self) -> int:
        return self.vlm_image_size // self.vlm_patch_size

    @property
    def sam_feat_size(self) -> int:
        return self.sam_image_size // 16

    @property
    def max_memory_frames(self) -> int:
        """Spatial memories one tracked frame attends at most: anchors + previous frames."""
        return self.max_anchors_in_attn + self.num_maskmem - 1

    @property
    def max_pointer_frames(self) -> int:
        """Object pointers one tracked frame attends at most: the attended anchors + the
        earlier frames in reach (anchors far back add to those, see `select_memory`)."""
        return self.max_anchors_in_attn + self.max_obj_ptrs - 1

    @property
    def prompt_tokens(self) -> int:
        """Sparse prompt tokens per anchor frame: STF's [SEG] tokens, or a click and SAM2's
        padding point."""
        return 2 if self.stf_point_prompt else self.num_seg_tokens

    @property
    def sam_lowres_size(self) -> int:
        return self.sam_image_size // 4

    @property
    def stf_downsamples(self) -> int:
        return int(round(math.log2(self.sam_feat_size // self.stf_grid)))

    @property
    def hiera_channels(self) -> list[int]:
        return [self.hiera_embed_dim * 2**i for i in reversed(range(len(self.hiera_stages)))]

    # ---- validation and (de)serialisation ----
    def __post_init__(self):
        checks = [
            (self.vlm_image_size % self.vlm_patch_size == 0, "vlm_image_size % vlm_patch_size"),
            (self.sam_image_size % 64 == 0, "sam_image_size must be a multiple of 64"),
            (self.sam_feat_size % self.stf_grid == 0
             and 2 ** self.stf_downsamples * self.stf_grid == self.sam_feat_size,
             "sam_image_size/16 must be stf_grid times a power of two"),
            (self.sam_dim % self.stf_heads == 0, "sam_dim % stf_heads"),
            (self.sam_dim % self.mem_dim == 0, "sam_dim % mem_dim"),
            ((self.sam_dim // 2) % self.sam_decoder_heads == 0,
             "sam_dim / 2 % sam_decoder_heads (the decoder's cross-attention width)"),
            (self.llm_hidden % self.llm_heads == 0, "llm_hidden % llm_heads"),
            (self.llm_heads % self.llm_kv_heads == 0, "llm_heads % llm_kv_heads"),
            (self.umt_width % self.umt_heads == 0, "umt_width % umt_heads"),
            (self.umt_grid ** 2 > self.tokens_per_frame, "ToMe must remove tokens"),
            (self.seg_token_id < self.vocab_size, "seg_token_id < vocab_size"),
            (self.sam_resize in ("bilinear", "bicubic"), "sam_resize in {bilinear, bicubic}"),
            (self.vlm_resize in ("bilinear", "bicubic"), "vlm_resize in {bilinear, bicubic}"),
            (self.max_anchors_in_attn >= 2, "SAM2 needs max_anchors_in_attn >= 2"),
            (0 < self.stf_click_power <= 4, "stf_click_power in (0, 4]"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ConfigError(f"inconsistent VIRST config ({self.preset}): " + "; ".join(bad))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VirstConfig:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VirstConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err

    def replace(self, **changes) -> VirstConfig:
        """A copy with `changes`; unknown fields and inconsistent values are refused by name."""
        return type(self).from_dict({**self.to_dict(), **changes})


# Only the numbers that differ from the official model.
_PRESETS: dict[str, dict] = {
    "virst-7b": {},
    "tiny": dict(
        vlm_image_size=112, umt_width=64, umt_depth=2, umt_heads=4, umt_mlp=256, umt_pos_grid=5,
        llm_hidden=128, llm_layers=2, llm_heads=4, llm_kv_heads=2, llm_ffn=344,
        llm_max_positions=4096, vocab_size=512, seg_token_id=4,
        sam_image_size=256, hiera_embed_dim=32, hiera_heads=1, hiera_stages=(1, 2, 2, 1),
        hiera_global_blocks=(4,), hiera_window_spec=(8, 4, 8, 4), hiera_pos_bkg=(4, 4),
        sam_dim=64, sam_decoder_heads=2, mem_dim=16, mem_attn_layers=2, mem_attn_ffn=256,
        mem_fuser_layers=1,
        stf_grid=8, stf_heads=2, fusion_heads=4,
    ),
}


def preset(name: str, **overrides) -> VirstConfig:
    """Build a preset config; `overrides` replace single fields."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(_PRESETS)}")
    return VirstConfig(preset=name, **{**_PRESETS[name], **overrides})


PRESET_NAMES = tuple(_PRESETS)
