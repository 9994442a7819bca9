"""SAM2.1 built from our config with the `sam2` package's own modules (no hydra, no network).

The settings are those of `configs/sam2.1/sam2.1_hiera_l.yaml` as the VIRST release uses it
(multimask output everywhere, object pointers with signed temporal encoding, occlusion head);
only the sizes come from `VirstConfig`.
"""

from __future__ import annotations

import torch

from virst.config import VirstConfig
from virst.errors import ConfigError

try:
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
    from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
    from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine
    from sam2.modeling.sam.transformer import RoPEAttention, TwoWayTransformer
    from sam2.modeling.sam2_base import SAM2Base
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    raise ConfigError(
        "the `sam2` package is missing; install it without its torchvision pin: "
        "SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0 "
        "(scripts/bootstrap.sh does this)"
    ) from err


def _image_encoder(cfg: VirstConfig) -> ImageEncoder:
    trunk = Hiera(
        embed_dim=cfg.hiera_embed_dim,
        num_heads=cfg.hiera_heads,
        stages=cfg.hiera_stages,
        global_att_blocks=cfg.hiera_global_blocks,
        window_pos_embed_bkg_spatial_size=cfg.hiera_pos_bkg,
        window_spec=cfg.hiera_window_spec,
    )
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(
            num_pos_feats=cfg.sam_dim, normalize=True, temperature=10000,
            image_size=cfg.sam_image_size, warmup_cache=False,
        ),
        d_model=cfg.sam_dim,
        backbone_channel_list=cfg.hiera_channels,
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )
    return ImageEncoder(trunk=trunk, neck=neck, scalp=1)


def _rope_attention(cfg: VirstConfig, **extra) -> RoPEAttention:
    size = cfg.sam_feat_size
    return RoPEAttention(
        embedding_dim=cfg.sam_dim, num_heads=1, downsample_rate=1, dropout=0.1,
        rope_theta=10000.0, feat_sizes=(size, size), **extra,
    )


def _memory_attention(cfg: VirstConfig) -> MemoryAttention:
    layer = MemoryAttentionLayer(
        activation="relu",
        self_attention=_rope_attention(cfg),
        cross_attention=_rope_attention(cfg, rope_k_repeat=True, kv_in_dim=cfg.mem_dim),
        d_model=cfg.sam_dim,
        dim_feedforward=cfg.mem_attn_ffn,
        dropout=0.1,
        pos_enc_at_attn=False,
        pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False,
    )
    return MemoryAttention(
        d_model=cfg.sam_dim, pos_enc_at_input=True, layer=layer, num_layers=cfg.mem_attn_layers
    )


def _memory_encoder(cfg: VirstConfig) -> MemoryEncoder:
    return MemoryEncoder(
        out_dim=cfg.mem_dim,
        position_encoding=PositionEmbeddingSine(
            num_pos_feats=cfg.mem_dim, normalize=True, temperature=10000,
            image_size=cfg.sam_image_size, warmup_cache=False,
        ),
        mask_downsampler=MaskDownSampler(
            embed_dim=cfg.sam_dim, kernel_size=3, stride=2, padding=1
        ),
        fuser=Fuser(
            CXBlock(dim=cfg.sam_dim, kernel_size=7, padding=3,
                    layer_scale_init_value=1e-6, use_dwconv=True),
            num_layers=cfg.mem_fuser_layers,
        ),
        in_dim=cfg.sam_dim,
    )


class VirstSAM2(SAM2Base):
    """SAM2Base whose mask decoder takes its head count from the config (SAM2 fixes 8), and
    whose position-encoding caches are emptied when it moves."""

    def __init__(self, decoder_heads: int = 8, **kwargs):
        self.decoder_heads = decoder_heads
        super().__init__(**kwargs)

    def _apply(self, fn, recurse=True):
        # SAM2 caches position encodings by feature size in plain dicts that `.to()` does
        # not move: made on one device and read on another, an entry is copied across on
        # every call (on a GPU a blocking host copy each frame, and no CUDA-graph capture).
        # Emptied here, they are made again on the device of the next call.
        for m in self.modules():
            if isinstance(m, PositionEmbeddingSine):
                m.cache.clear()
        return super()._apply(fn, recurse)

    def _build_sam_heads(self):
        super()._build_sam_heads()
        old = self.sam_mask_decoder.transformer
        if self.decoder_heads != old.num_heads:  # 8 heads: SAM2's modules, untouched
            self.sam_mask_decoder.transformer = TwoWayTransformer(
                depth=old.depth, embedding_dim=old.embedding_dim, mlp_dim=old.mlp_dim,
                num_heads=self.decoder_heads)


def init_prompt_attention(sam: SAM2Base, scale: float = 3.0) -> None:
    """From-scratch start for the decoder's token-to-image cross-attention: key projection
    = query projection x `scale`.

    A prompt token finds its place in the image only through the dot product of its
    positional encoding (or content) with the image's; with independent random q/k
    projections that product carries no location, the decoder learns "mask every salient
    object" first and never recovers. With k = q the attention starts as a (sharpened)
    similarity match, so a click attends to its own location from step 0. Measured on
    held-out shapes frames: click IoU 0.24 -> 0.72 in 300 decoder steps with 2 heads; no
    escape from the collapse without it (DESIGN.md section 7). Pretrained weights (the
    release) never need this; only training from scratch does.
    """
    transformer = sam.sam_mask_decoder.transformer
    attns = [layer.cross_attn_token_to_image for layer in transformer.layers]
    with torch.no_grad():
        for attn in [*attns, transformer.final_attn_token_to_image]:
            attn.k_proj.weight.copy_(attn.q_proj.weight * scale)
            attn.k_proj.bias.copy_(attn.q_proj.bias * scale)


def build_sam2(cfg: VirstConfig) -> SAM2Base:
    """SAM2Base with the VIRST (SAM2.1 video) settings and `cfg`'s sizes."""
    return VirstSAM2(
        decoder_heads=cfg.sam_decoder_heads,
        image_encoder=_image_encoder(cfg),
        memory_attention=_memory_attention(cfg),
        memory_encoder=_memory_encoder(cfg),
        num_maskmem=cfg.num_maskmem,
        image_size=cfg.sam_image_size,
        sigmoid_scale_for_mem_enc=20.0,
        sigmoid_bias_for_mem_enc=-10.0,
        use_mask_input_as_output_without_sam=True,
        max_cond_frames_in_attn=cfg.max_anchors_in_attn,
        directly_add_no_mem_embed=True,
        no_obj_embed_spatial=True,
        use_high_res_features_in_sam=True,
        multimask_output_in_sam=True,
        iou_prediction_use_sigmoid=True,
        use_obj_ptrs_in_encoder=True,
        max_obj_ptrs_in_encoder=cfg.max_obj_ptrs,
        add_tpos_enc_to_obj_ptrs=True,
        proj_tpos_enc_in_obj_ptrs=True,
        use_signed_tpos_enc_to_obj_ptrs=True,
        only_obj_ptrs_in_the_past_for_eval=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        fixed_no_obj_ptr=True,
        multimask_output_for_tracking=True,
        use_multimask_token_for_obj_ptr=True,
        multimask_min_pt_num=0,
        multimask_max_pt_num=1,
        use_mlp_for_obj_ptr_proj=True,
    )
