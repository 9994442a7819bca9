"""The assembled pipeline: save/load, tiny segmentation, official sizes and keys, bad input."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from virst.config import preset
from virst.data.render import Shape, render
from virst.errors import CheckpointError, ConfigError, InputError, VideoError
from virst.model import VirstModel, init_empty_weights, parameter_table


@pytest.fixture(scope="module")
def tiny():
    """Random tiny model whose occlusion head is biased to "present", so that masks are
    real logits rather than the constant no-object score."""
    model = VirstModel.from_preset("tiny", seed=0)
    with torch.no_grad():
        model.sam2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 1.0
    return model


@pytest.fixture(scope="module")
def clip():
    t = 32
    rng = np.random.default_rng(0)
    path = np.stack([np.linspace(20, 140, t), np.full(t, 50.0)], 1)
    shapes = [Shape("circle", "red", 12, path, 1),
              Shape("square", "blue", 14, np.tile([[80.0, 60.0]], (t, 1)), 0)]
    frames, _ = render(shapes, 96, 160, t, rng)
    return frames


def test_tiny_segments_a_32_frame_clip(tiny, clip):
    masks = tiny.segment(clip, "the red circle")
    assert masks.shape == (32, 96, 160) and masks.dtype == bool
    logits = tiny.segment(clip, "the red circle", return_logits=True)
    assert logits.dtype == np.float32 and np.array_equal(logits > 0, masks)
    assert np.array_equal(tiny.segment(clip, "the red circle"), masks)  # deterministic
    assert (logits > -1024).all() and 0 < masks.mean() < 1
    other = tiny.segment(clip, "the blue square", return_logits=True)
    assert not np.allclose(other, logits)  # the expression reaches the masks


def test_save_and_load_give_identical_outputs(tiny, clip, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    again = VirstModel.from_pretrained(tmp_path / "m")
    assert again.config == tiny.config
    a = tiny.segment(clip[:12], "the red circle", return_logits=True)
    b = again.segment(clip[:12], "the red circle", return_logits=True)
    assert np.array_equal(a, b)


def test_a_changed_config_field_restarts_only_the_parts_it_reshapes(tiny, tmp_path):
    """`virst train --init F --set stf_grid=...`: STF's downsampler changes depth, so STF
    (and the unused initial fusion, built with the same grid) start fresh; SAM2 and the
    VLM load unchanged."""
    tiny.save_pretrained(tmp_path / "m")
    grid = 8 if tiny.config.stf_grid != 8 else 4
    changed, fresh = VirstModel.from_pretrained_changed(tmp_path / "m", stf_grid=grid)
    assert changed.config.stf_grid == grid
    assert fresh == ["initial_seg_fusion", "seg_prompter"]
    old, new = tiny.state_dict(), changed.state_dict()
    assert all(torch.equal(old[k], v) for k, v in new.items() if k.startswith(("sam2.", "vlm.")))
    assert not torch.equal(old["seg_prompter.seg_proj.weight"],
                           new["seg_prompter.seg_proj.weight"])
    with pytest.raises(ConfigError, match="unknown config fields: stf_grdi"):
        VirstModel.from_pretrained_changed(tmp_path / "m", stf_grdi=8)
    with pytest.raises(ConfigError, match="inconsistent"):
        VirstModel.from_pretrained_changed(tmp_path / "m", stf_grid=5)
    same, nothing = VirstModel.from_pretrained_changed(tmp_path / "m")
    assert nothing == [] and all(torch.equal(old[k], v) for k, v in same.state_dict().items())
    # a field that only adds tensors keeps the part: motion keys start as a zero projection
    moving, kept = VirstModel.from_pretrained_changed(tmp_path / "m", stf_motion_keys=True)
    new = moving.state_dict()
    assert kept == [] and all(torch.equal(old[k], new[k]) for k in old)
    assert not new["seg_prompter.motion_proj.2.weight"].any()
    moving.save_pretrained(tmp_path / "moving")  # switched off again: trained tensors lost
    _, restarted = VirstModel.from_pretrained_changed(tmp_path / "moving", stf_motion_keys=False)
    assert restarted == ["seg_prompter"]
    # a folder from when the motion projection was one linear map: that map alone restarts
    weights = tmp_path / "moving" / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if "motion_proj" not in k}
    save_file({**state, "seg_prompter.motion_proj.weight": torch.ones(64, 64),
               "seg_prompter.motion_proj.bias": torch.ones(64)}, str(weights))
    with pytest.raises(CheckpointError, match="motion_proj"):
        VirstModel.from_pretrained(tmp_path / "moving")
    again, kept = VirstModel.from_pretrained_changed(tmp_path / "moving", stf_motion_keys=True)
    new = again.state_dict()
    assert kept == [] and all(torch.equal(state[k], new[k]) for k in state)
    assert not new["seg_prompter.motion_proj.2.weight"].any()


def test_checkpoint_problems_name_the_tensors(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state.pop("seg_prompter.seg_proj.weight")
    state["vlm.lm_head.weight"] = torch.zeros(3, 3)
    state["occ_predictor.weight"] = torch.zeros(1, 256)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError) as err:
        VirstModel.from_pretrained(tmp_path / "m")
    msg = str(err.value)
    assert "1 missing: seg_prompter.seg_proj.weight" in msg
    assert "1 unexpected: occ_predictor.weight" in msg
    assert "vlm.lm_head.weight (3, 3) != (512, 128)" in msg
    weights.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        VirstModel.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        VirstModel.from_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="does not exist"):
        VirstModel.from_pretrained(tmp_path / "nowhere")


def test_bad_inputs_to_segment(tiny, tmp_path):
    with pytest.raises(InputError, match="expression is empty"):
        tiny.segment(np.zeros((4, 32, 32, 3), np.uint8), " ")
    with pytest.raises(VideoError, match="empty"):
        tiny.segment(np.zeros((0, 32, 32, 3), np.uint8), "the red circle")
    with pytest.raises(VideoError, match="no frames in folder"):
        tiny.segment(tmp_path, "the red circle")
    with pytest.raises(ConfigError, match="unknown preset"):
        VirstModel.from_preset("virst-13b")


def test_virst_7b_on_meta_has_the_official_size():
    with init_empty_weights():
        model = VirstModel(preset("virst-7b"))
    rows = dict(parameter_table(model))
    assert 8.15e9 < rows["total"] < 8.25e9  # "about 8.2 B" with the lm_head
    assert 7.05e9 < rows["Qwen2 decoder (incl. embeddings)"] < 7.1e9
    assert model.vlm.llm.embed_tokens.weight.shape == (151647, 3584)
    assert 2.9e8 < rows["UMT video tower"] < 2.92e8
    assert 2.12e8 < rows["SAM2 image encoder"] < 2.14e8
    assert all(p.is_meta for p in model.parameters())


def test_sam2_keys_and_shapes_equal_the_official_sam2_1_hiera_large():
    """Our SAM2 built from the config has exactly the state dict of sam2's own
    `configs/sam2.1/sam2.1_hiera_l.yaml` model, so released SAM2 weights load by name."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    with initialize_config_module("sam2", version_base="1.2"), init_empty_weights():
        official = instantiate(compose("configs/sam2.1/sam2.1_hiera_l.yaml").model,
                               _recursive_=True)
        ours = VirstModel(preset("virst-7b")).sam2
    GlobalHydra.instance().clear()
    want = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert have == want


def test_initial_seg_fusion_flag_changes_the_llm_input(clip):
    """Stage-1 fusion is off by default (as in the official evaluation) and, when switched
    on, writes the fused [SEG] embeddings back before the LLM."""
    off = VirstModel.from_preset("tiny", seed=0)
    on = VirstModel.from_preset("tiny", seed=0, initial_seg_fusion=True)
    on.load_state_dict(off.state_dict())
    with torch.no_grad():
        for m in (off, on):
            m.sam2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 1.0
    a = off.segment(clip[:8], "the red circle", return_logits=True)
    b = on.segment(clip[:8], "the red circle", return_logits=True)
    assert not np.allclose(a, b)
    with torch.no_grad():
        on.initial_seg_fusion.gate.zero_()  # a closed gate is the identity
    assert np.array_equal(on.segment(clip[:8], "the red circle", return_logits=True), a)


def test_model_input_leaves_the_callers_frames_as_they_were():
    """The division by 255 runs in place on a copy: float32 frames on the CPU (which
    `.to(torch.float32)` alone would return as a view of the caller's array) stay unchanged."""
    from virst.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_model_input

    frames = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32) * 255
    before = frames.copy()
    x = to_model_input(frames, 16)
    assert np.array_equal(frames, before)
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    expect = ((before / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    assert np.allclose(x.numpy(), expect, atol=1e-5)
