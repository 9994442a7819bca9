import pytest

from virst.config import VirstConfig, preset
from virst.errors import ConfigError


def test_presets_share_one_type_and_differ_only_in_sizes():
    big, tiny = preset("virst-7b"), preset("tiny")
    assert type(big) is type(tiny) is VirstConfig
    assert (big.llm_hidden, big.llm_layers, big.llm_heads, big.llm_kv_heads) == (3584, 28, 28, 4)
    assert (big.umt_depth, big.umt_width, big.umt_heads, big.umt_mlp) == (23, 1024, 16, 4096)
    assert (big.sam_feat_size, big.sam_lowres_size, big.hiera_channels) == (
        64, 256, [1152, 576, 288, 144])
    assert (big.num_seg_tokens, big.num_maskmem, big.max_anchors_in_attn, big.max_obj_ptrs) == (
        10, 7, 3, 16)
    assert (big.stf_grid, big.stf_heads, big.stf_layers, big.stf_downsamples) == (8, 8, 2, 3)
    assert big.umt_grid ** 2 * big.clip_frames == 3136
    # same switches, smaller numbers
    assert tiny.initial_seg_fusion == big.initial_seg_fusion is False
    assert tiny.num_seg_tokens == 10 and tiny.num_maskmem == 7


def test_json_round_trip(tmp_path):
    cfg = preset("tiny", initial_seg_fusion=True)
    cfg.save(tmp_path / "c.json")
    assert VirstConfig.load(tmp_path / "c.json") == cfg


def test_bad_configs_are_refused_with_names(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ConfigError, match="stf_grid"):
        preset("tiny", stf_grid=3)
    (tmp_path / "c.json").write_text('{"preset": "tiny", "hidden": 3}')
    with pytest.raises(ConfigError, match="unknown config fields: hidden"):
        VirstConfig.load(tmp_path / "c.json")
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config"):
        VirstConfig.load(tmp_path / "d.json")


def test_decoder_heads_come_from_the_config_and_old_folders_load_as_8(tmp_path):
    """16 lanes per head at every width (tiny: 2 heads), 8 for virst-7b as SAM2; a model
    folder written before the field existed is an 8-head model and computes as before."""
    import json

    import torch

    from virst.model import VirstModel, init_empty_weights

    assert preset("tiny").sam_decoder_heads == 2 and preset("virst-7b").sam_decoder_heads == 8
    with init_empty_weights():
        big = VirstModel(preset("virst-7b"))
    attn = big.sam2.sam_mask_decoder.transformer.layers[0].cross_attn_token_to_image
    assert big.sam2.sam_mask_decoder.transformer.num_heads == attn.num_heads == 8
    tiny = VirstModel.from_preset("tiny")
    assert tiny.sam2.sam_mask_decoder.transformer.final_attn_token_to_image.num_heads == 2
    old = VirstModel.from_preset("tiny", sam_decoder_heads=8)
    old.save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    del cfg["sam_decoder_heads"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    loaded = VirstModel.from_pretrained(tmp_path / "old")
    assert loaded.sam2.sam_mask_decoder.transformer.num_heads == 8
    frames = torch.randint(0, 255, (5, 40, 56, 3), dtype=torch.uint8).numpy()
    assert (loaded.segment(frames, "the red circle", return_logits=True)
            == old.segment(frames, "the red circle", return_logits=True)).all()
    with pytest.raises(ConfigError, match="sam_decoder_heads"):
        preset("tiny", sam_decoder_heads=3)


def test_point_prompt_is_off_unless_asked_and_sets_the_prompt_size():
    """`stf_point_prompt` (ours): off in both presets and in a config written before it
    existed (the release's 10 STF tokens); on, the anchor prompt is a click + padding."""
    for name in ("virst-7b", "tiny"):
        assert not preset(name).stf_point_prompt and preset(name).prompt_tokens == 10
    old = preset("tiny").to_dict()
    del old["stf_point_prompt"]
    assert not VirstConfig.from_dict(old).stf_point_prompt
    assert preset("tiny", stf_point_prompt=True).prompt_tokens == 2


def test_click_power_defaults_to_the_plain_weighting_and_is_checked():
    """`stf_click_power` (ours): 1 in the presets and in a config written before it existed
    (the click those models trained with); out of (0, 4] refused by name."""
    old = preset("tiny").to_dict()
    del old["stf_click_power"]
    assert VirstConfig.from_dict(old).stf_click_power == 1.0 == preset("virst-7b").stf_click_power
    for bad in (0.0, -1.0, 9.0):
        with pytest.raises(ConfigError, match="stf_click_power"):
            preset("tiny", stf_click_power=bad)


def test_from_scratch_start_aligns_the_decoder_cross_attention():
    from virst.model import VirstModel
    from virst.sam2_model import init_prompt_attention

    sam = VirstModel.from_preset("tiny").sam2
    init_prompt_attention(sam, scale=3.0)
    t = sam.sam_mask_decoder.transformer
    for attn in [*(layer.cross_attn_token_to_image for layer in t.layers),
                 t.final_attn_token_to_image]:
        assert (attn.k_proj.weight == 3 * attn.q_proj.weight).all()
        assert (attn.k_proj.bias == 3 * attn.q_proj.bias).all()
    image_to_token = t.layers[0].cross_attn_image_to_token
    assert not (image_to_token.k_proj.weight == 3 * image_to_token.q_proj.weight).all()
