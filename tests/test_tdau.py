"""TDAU: anchor placement, SAM2 memory selection, and bit-exactness against SAM2Base itself."""

from fractions import Fraction

import pytest
import torch
from conftest import make_tiny_sam

from virst.config import preset
from virst.tdau import (
    TorchSam2Steps,
    anchor_indices,
    closest_anchors,
    encode_frames,
    no_prompt_tokens,
    predict_anchor,
    propagate,
    select_memory,
)


def test_anchor_indices_follow_the_formula_for_every_t_seg():
    """K = max(1, T//4) at round(j (T-1) / (K-1)), half to even; the release evaluates it in
    float32, which moves exactly one anchor off the exact half for T <= 100 (T=94, j=11)."""
    for t_seg in range(1, 101):
        k = max(1, t_seg // 4)
        exact = [0] if k == 1 else [round(Fraction(j * (t_seg - 1), k - 1)) for j in range(k)]
        if t_seg == 94:
            assert exact[11] == 46
            exact[11] = 47  # 46.5 in exact arithmetic, 46.50000x in float32
        assert anchor_indices(t_seg) == exact, t_seg
        assert len(set(exact)) == k and exact[0] == 0 and exact[-1] == (t_seg - 1 if k > 1 else 0)
    assert anchor_indices(32) == [0, 4, 9, 13, 18, 22, 27, 31]
    assert anchor_indices(10) == [0, 9]
    assert anchor_indices(3) == [0]
    assert anchor_indices(28) == [0, 4, 9, 14, 18, 22, 27]  # 4.5 -> 4, 13.5 -> 14, 22.5 -> 22
    with pytest.raises(ValueError):
        anchor_indices(0)


def test_closest_anchors_before_after_then_nearest():
    anchors = [0, 10, 20, 30, 40]
    assert closest_anchors(15, anchors, 3) == [10, 20, 0]  # tie 0/30 at 15: earlier first
    assert closest_anchors(25, anchors, 3) == [20, 30, 10]
    assert closest_anchors(5, [10, 20, 30, 40], 3) == [10, 20, 30]  # none before: future ones
    assert closest_anchors(45, anchors, 3) == [40, 30, 20]
    assert closest_anchors(45, [0, 40], 3) == [0, 40]  # few anchors: all, in order


def test_select_memory_cases():
    plan = select_memory(12, [0, 10, 20, 30], 100)
    assert plan.anchors == (10, 20, 0)
    # previous frames 6..11 (t_pos 1..6); anchor 10 is attended as an anchor, so skipped
    assert plan.previous == ((1, 6), (2, 7), (3, 8), (4, 9), (6, 11))
    # pointers: past attended anchors (signed distance), then up to 15 previous frames
    assert plan.pointers[:2] == ((2, 10), (12, 0))
    assert [f for _, f in plan.pointers[2:]] == [11, 9, 8, 7, 6, 5, 4, 3, 2, 1]

    # an anchor that is not attended still counts as an ordinary previous frame
    plan = select_memory(7, [0, 2, 4, 6, 8], 100)
    assert plan.anchors == (6, 8, 4)
    assert plan.previous == ((1, 1), (2, 2), (3, 3), (5, 5))  # 2 is an unattended anchor
    assert plan.pointers == ((1, 6), (3, 4), (2, 5), (4, 3), (5, 2), (6, 1), (7, 0))

    # before the first anchor: only future anchors' spatial memory, no pointers
    plan = select_memory(0, [3, 9], 20)
    assert plan.anchors == (3, 9) and plan.previous == () and plan.pointers == ()

    # pointer window shrinks with short videos: min(num_frames, 16) - 1 previous frames
    plan = select_memory(7, [0], 8)
    assert [d for d, _ in plan.pointers] == [7, 1, 2, 3, 4, 5, 6]

    # the most a frame can attend (what padded units and engine profiles must hold):
    # 3 anchors far back + 15 previous pointers, 3 anchors + 6 previous spatial memories
    cfg = preset("virst-7b")
    plan = select_memory(130, [0, 50, 100], 131)
    assert len(plan.pointers) == cfg.max_pointer_frames == 18
    assert len(plan.anchors) + len(plan.previous) == cfg.max_memory_frames == 9


def _sam2_outputs(sam, feats, frames, anchor_outputs, num_frames):
    """Reference: SAM2Base.track_step over the same frames with our anchors as cond frames."""
    out_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    for a, out in anchor_outputs.items():
        out_dict["cond_frame_outputs"][a] = {
            "maskmem_features": out.maskmem, "maskmem_pos_enc": [out.maskmem_pos],
            "obj_ptr": out.obj_ptr, "pred_masks": out.low_res,
        }
    masks = {}
    for t in frames:
        if t in anchor_outputs:
            masks[t] = anchor_outputs[t].low_res
            continue
        f = feats[t]
        cur = sam.track_step(t, False, f.vision, f.pos, f.sizes, None, None, out_dict, num_frames)
        out_dict["non_cond_frame_outputs"][t] = cur
        masks[t] = cur["pred_masks"]
    return masks


@torch.inference_mode()
def test_anchor_with_constant_prompt_equals_sam2_initial_frame(tiny_sam, tiny_cfg):
    torch.manual_seed(1)
    size = tiny_cfg.sam_image_size
    (feats,) = encode_frames(tiny_sam, torch.randn(1, 3, size, size))
    ours = predict_anchor(tiny_sam, feats, no_prompt_tokens(tiny_sam), bf16_storage=False)
    ref = tiny_sam.track_step(0, True, feats.vision, feats.pos, feats.sizes, None, None,
                              {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}, 1)
    assert torch.equal(ours.low_res, ref["pred_masks"])
    assert torch.equal(ours.obj_ptr, ref["obj_ptr"])
    assert torch.equal(ours.maskmem, ref["maskmem_features"])


@torch.inference_mode()
@pytest.mark.parametrize("anchors,object_bias", [
    ((0, 5, 9, 14, 19), 1.0), ((2, 11), 1.0), ((6,), 1.0), ((0, 7, 14), -0.07)])
def test_propagation_is_bit_exact_against_sam2base(tiny_cfg, anchors, object_bias):
    """Every frame's mask logits equal SAM2Base.track_step's, bit for bit; the last case
    has the object absent on some frames (NO_OBJ masks, no_obj_ptr) and present on others."""
    tiny_sam = make_tiny_sam(tiny_cfg, object_bias)
    torch.manual_seed(2)
    num_frames, size = 21, tiny_cfg.sam_image_size
    feats = encode_frames(tiny_sam, torch.randn(num_frames, 3, size, size))
    prompts = {a: torch.randn(1, 10, tiny_cfg.sam_dim) for a in anchors}
    steps = TorchSam2Steps(tiny_sam, bf16_storage=False)
    ours = dict(propagate(steps, feats.__getitem__, prompts, num_frames))
    anchor_out = {a: ours[a] for a in anchors}
    frames = range(num_frames)  # frames before the first anchor see only future anchors
    ref = _sam2_outputs(tiny_sam, feats, frames, anchor_out, num_frames)
    for t in frames:
        assert torch.equal(ours[t].low_res, ref[t]), f"frame {t}"
    assert len(ours) == num_frames
    present = [bool(ours[t].obj_score > 0) for t in frames]
    assert any(present)
    if object_bias < 0:
        assert not all(present)


@torch.inference_mode()
def test_bf16_storage_rounds_only_the_spatial_memory(tiny_sam, tiny_cfg):
    torch.manual_seed(3)
    size = tiny_cfg.sam_image_size
    feats = encode_frames(tiny_sam, torch.randn(6, 3, size, size))
    prompts = {0: torch.randn(1, 10, tiny_cfg.sam_dim)}
    bf = dict(propagate(TorchSam2Steps(tiny_sam, True), feats.__getitem__, prompts, 6))
    fp = dict(propagate(TorchSam2Steps(tiny_sam, False), feats.__getitem__, prompts, 6))
    assert bf[0].maskmem.dtype == torch.bfloat16 and fp[0].maskmem.dtype == torch.float32
    assert torch.equal(bf[0].low_res, fp[0].low_res)  # the anchor itself is unaffected
    assert torch.equal(bf[0].maskmem.float(), fp[0].maskmem.bfloat16().float())
    diff = (bf[5].low_res - fp[5].low_res).abs().max()
    assert 0 < diff < 1e-1  # later frames see slightly rounded memories
