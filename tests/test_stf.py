"""STF: RoPE3D by hand-computed angles, SegPrompter/InitialSegFusion semantics and keys."""

import math

import pytest
import torch

from virst.stf import (
    InitialSegFusion,
    RoPE3D,
    SegPrompter,
    attention_points,
    frame_motion,
    own_frame_attention,
    rotate_pairs,
    stf_prompts,
)


def _rotate_by_hand(vec, angles):
    """Rotate each interleaved pair (v[2i], v[2i+1]) by angles[i]."""
    out = vec.clone()
    for i, a in enumerate(angles):
        x0, x1 = vec[2 * i].item(), vec[2 * i + 1].item()
        out[2 * i] = x0 * math.cos(a) - x1 * math.sin(a)
        out[2 * i + 1] = x0 * math.sin(a) + x1 * math.cos(a)
    return out


def test_rope3d_key_rotation_matches_hand_computed_angles():
    rope = RoPE3D(head_dim=32, grid_hw=8)
    assert rope.axis_lanes == 10
    inv = [1 / 10000 ** (j / 5) for j in range(5)]
    t, y, x = 2, 5, 3
    token = t * 64 + y * 8 + x
    vec = torch.randn(32, dtype=torch.float64)
    angles = ([t * f for f in inv] + [y * f for f in inv] + [x * f for f in inv] + [0.0])
    expected = _rotate_by_hand(vec, angles)
    keys = torch.zeros(3 * 64, 32, dtype=torch.float64)
    keys[token] = vec
    rotated = RoPE3D.rotate(keys.float(), rope.key_angles(3))[token].double()
    assert torch.allclose(rotated, expected, atol=1e-5)
    assert torch.equal(rotated[30:], vec[30:].float().double())  # 2 free lanes untouched


def test_rope3d_queries_rotate_only_time_lanes_by_their_frame():
    rope = RoPE3D(head_dim=32, grid_hw=8)
    n, frames = 3, 7
    q = torch.randn(n * frames, 32)
    out = RoPE3D.rotate(q, rope.query_angles(n, frames))
    inv = [1 / 10000 ** (j / 5) for j in range(5)]
    for i in (0, 6, 7, 20):  # query i = n * T + t rotates by t = i % T
        t = i % frames
        expected = _rotate_by_hand(q[i].double(), [t * f for f in inv] + [0.0] * 11)
        assert torch.allclose(out[i].double(), expected, atol=1e-5)
    assert torch.equal(out[:, 10:], q[:, 10:])  # y, x and free lanes of queries: unrotated
    assert torch.equal(out[0], q[0]) and torch.equal(out[frames], q[frames])  # t = 0


def test_rotate_pairs_is_the_gptj_convention():
    x = torch.arange(6.0)
    assert rotate_pairs(x).tolist() == [-1, 0, -3, 2, -5, 4]


@pytest.fixture()
def prompter():
    torch.manual_seed(0)
    return SegPrompter(in_dim=48, token_dim=64, grid_hw=4, nhead=2, feat_hw=16).eval()


def test_segprompter_shapes_and_frame_score(prompter):
    seg, img = torch.randn(2, 10, 48), torch.randn(2, 5, 64, 16, 16)
    out, score = prompter(seg, img, return_frame_score=True)
    assert out.shape == (2, 10, 5, 64) and score.shape == (2, 5)
    assert torch.allclose(score.sum(-1), torch.full((2,), 1 / 16))
    assert torch.equal(prompter(seg, img), out)
    # each frame's prompt depends on that frame: changing frame 3 changes mostly frame 3
    img2 = img.clone()
    img2[:, 3] += 1
    out2 = prompter(seg, img2)
    assert not torch.allclose(out2[:, :, 3], out[:, :, 3])


def test_segprompter_query_padding_mask(prompter):
    seg, img = torch.randn(1, 10, 48), torch.randn(1, 4, 64, 16, 16)
    keep = torch.ones(1, 10, dtype=torch.bool)
    assert torch.allclose(prompter(seg, img, seg_mask=keep), prompter(seg, img), atol=1e-6)
    keep[0, 7:] = False  # padded [SEG] tokens do not influence the others
    a = prompter(seg, img, seg_mask=keep)
    seg2 = seg.clone()
    seg2[0, 8] = 100
    b = prompter(seg2, img, seg_mask=keep)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-5)


def test_segprompter_rejects_mismatched_inputs(prompter):
    with pytest.raises(ValueError, match="disagree"):
        prompter(torch.randn(1, 10, 48), torch.randn(2, 4, 64, 16, 16))
    with pytest.raises(ValueError, match="max_frames"):
        prompter(torch.randn(1, 10, 48), torch.randn(1, 101, 64, 16, 16))
    with pytest.raises(ValueError, match="not both"):  # was: the frame score, silently
        prompter(torch.randn(1, 10, 48), torch.randn(1, 4, 64, 16, 16),
                 return_frame_score=True, return_attention=True)


def test_segprompter_attention_is_the_last_layers_per_head_attention(prompter):
    seg, img = torch.randn(1, 10, 48), torch.randn(1, 4, 64, 16, 16)
    out, attention = prompter(seg, img, return_attention=True)
    assert torch.equal(out, prompter(seg, img))
    heads = prompter.decoder[-1].cross_attn.nhead
    g = prompter.grid_hw
    assert attention.shape == (1, heads, 10 * 4, 4 * g * g)
    assert torch.allclose(attention.sum(-1), torch.ones(1, heads, 40), atol=1e-5)


def test_official_state_dict_keys():
    p = SegPrompter(in_dim=3584, token_dim=256, grid_hw=8, nhead=8, n_layers=2, feat_hw=64)
    keys = set(p.state_dict())
    layer = {f"decoder.{i}.{n}" for i in range(2) for n in (
        "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
        "self_attn.out_proj.bias", *(f"cross_attn.{x}_proj.{w}" for x in "qkvo"
                                     for w in ("weight", "bias")),
        *(f"ff.{j}.{w}" for j in (0, 2) for w in ("weight", "bias")),
        *(f"norm{j}.{w}" for j in (1, 2, 3) for w in ("weight", "bias")))}
    top = {f"spatial_down.{j}.{w}" for j in (0, 2, 4) for w in ("weight", "bias")}
    top |= {"memory_norm.weight", "memory_norm.bias", "seg_proj.weight", "seg_proj.bias"}
    assert keys == layer | top
    f = InitialSegFusion(hidden_dim=3584, vision_dim=256, token_dim=256, grid_hw=8, num_heads=8)
    assert {k.split(".")[0] for k in f.state_dict()} == {
        "spatial_down", "spatial_norm", "vision_proj", "norm_q", "norm_kv", "cross_attn", "gate"}
    assert f.spatial_down[4].weight.shape == (256, 256, 3, 3)


def test_initial_seg_fusion_is_a_gated_residual():
    torch.manual_seed(0)
    f = InitialSegFusion(hidden_dim=32, vision_dim=16, token_dim=16, grid_hw=2, num_heads=4,
                         feat_hw=8).eval()
    seg, vis = torch.randn(1, 10, 32), torch.randn(1, 3, 16, 8, 8)
    with torch.no_grad():
        f.gate.zero_()
        assert torch.equal(f(seg, vis), seg)
        f.gate.fill_(0.1)
        assert not torch.equal(f(seg, vis), seg)


def _one_hot_attention(frames, grid, cells, heads=2, tokens=3):
    """Last-layer attention whose frame-t queries all look at `cells[t]` (a dict cell ->
    weight) of frame t: (1, heads, tokens * frames, frames * grid^2), queries n-major."""
    att = torch.zeros(1, heads, tokens, frames, frames * grid * grid)
    for t, weights in enumerate(cells):
        for (y, x), w in weights.items():
            att[:, :, :, t, t * grid * grid + y * grid + x] = w
    return att.reshape(1, heads, tokens * frames, -1)


def test_attention_points_click_the_peak_cell_or_between_neighbours():
    grid, size = 4, 64  # 16-px cells
    att = _one_hot_attention(3, grid, [{(1, 2): 1.0}, {(3, 0): 0.5, (3, 1): 0.5},
                                       {(0, 0): 0.6, (3, 3): 0.4}])
    points = attention_points(att, 3, grid, size)
    assert points.shape == (1, 3, 2)
    # pixel indices (SAM2 adds 0.5): the centre of cell (y=1, x=2) is pixel (40, 24)
    assert torch.allclose(points[0, 0], torch.tensor([40.0, 24.0]) - 0.5)
    assert torch.allclose(points[0, 1], torch.tensor([16.0, 56.0]) - 0.5)  # between two
    assert torch.allclose(points[0, 2], torch.tensor([8.0, 8.0]) - 0.5)  # far cell: ignored
    # attention to another frame's cells does not move this frame's click
    other = att.clone().reshape(1, 2, 3, 3, 3, grid * grid)
    other[:, :, :, 0, 1] = 5.0
    assert torch.equal(attention_points(other.reshape(att.shape), 3, grid, size), points)


def test_own_frame_attention_is_each_querys_entries_on_its_own_frames_cells():
    """Query n*T + t, key t'*cells + c: kept where t' == t, exactly, as (B, heads, N, T,
    cells); gradients reach those entries only."""
    b, heads, n, frames, cells = 2, 3, 4, 5, 6
    att = torch.rand(b, heads, n * frames, frames * cells, requires_grad=True)
    own = own_frame_attention(att, frames)
    assert own.shape == (b, heads, n, frames, cells)
    for q in range(n):
        for t in range(frames):
            assert torch.equal(own[:, :, q, t], att[:, :, q * frames + t,
                                                    t * cells : (t + 1) * cells])
    own.sum().backward()
    grad = att.grad.reshape(b, heads, n, frames, frames, cells)
    assert torch.equal(grad, torch.eye(frames)[:, :, None].expand_as(grad))


def test_click_power_below_one_gives_the_peaks_neighbours_more_say():
    """`stf_click_power`: weights attention ** power; 1 is the plain weighting."""
    grid, size = 4, 64  # 16-px cells
    att = _one_hot_attention(1, grid, [{(2, 1): 0.8, (2, 2): 0.2}])
    assert torch.equal(attention_points(att, 1, grid, size, power=1.0),
                       attention_points(att, 1, grid, size))
    for power in (1.0, 0.5, 0.25):
        w_peak, w_next = 0.8 ** power, 0.2 ** power
        x = 24.0 + 16.0 * w_next / (w_peak + w_next)  # cell centres at 24 and 40 px
        expected = torch.tensor([x, 40.0]) - 0.5
        assert torch.allclose(attention_points(att, 1, grid, size, power=power)[0, 0],
                              expected, atol=1e-4), power


def test_point_prompts_are_sam2_clicks_at_stfs_attention_peak(prompter):
    from conftest import make_tiny_sam

    from virst.config import preset

    sam = make_tiny_sam(preset("tiny", sam_image_size=256))
    encoder = sam.sam_prompt_encoder
    seg, img = torch.randn(1, 10, 48), torch.randn(1, 5, 64, 16, 16)
    out, attention = stf_prompts(prompter, seg, img, encoder, return_attention=True)
    assert out.shape == (1, 2, 5, 64)  # a click and SAM2's padding point per frame
    assert torch.equal(stf_prompts(prompter, seg, img), prompter(seg, img))  # off: STF's own
    points = attention_points(attention, 5, prompter.grid_hw, 256)
    for t in range(5):
        click, _ = encoder(points=(points[:, t : t + 1], torch.ones(1, 1, dtype=torch.int32)),
                           boxes=None, masks=None)
        assert torch.allclose(out[:, :, t], click, atol=1e-6)
    # the mask loss reaches STF through the click's position
    prompter.train()
    stf_prompts(prompter, seg, img, encoder).sum().backward()
    assert prompter.decoder[-1].cross_attn.q_proj.weight.grad.abs().sum() > 0


def test_frame_motion_is_the_change_between_neighbouring_frames():
    x = torch.randn(2, 3, 4, 8)  # (B, T, cells, C)
    got = frame_motion(x.reshape(2, 12, 8), 3).reshape(x.shape)
    assert torch.equal(got[:, 0], x[:, 1] - x[:, 0])  # an edge repeats its own frame
    assert torch.equal(got[:, 1], x[:, 2] - x[:, 0])
    assert torch.equal(got[:, 2], x[:, 2] - x[:, 1])
    still = x[:, :1].expand(2, 3, 4, 8).reshape(2, 12, 8)
    assert not frame_motion(still, 3).any() and not frame_motion(x[:, 0], 1).any()


def test_motion_mlp_starts_silent_and_sees_a_move_in_either_direction(prompter):
    """`stf_motion_keys`: the added MLP starts with a zero output (a trained STF's outputs
    are kept); once trained it changes the prompts, and a move and its reverse both add a
    common "moves" part, which no linear map of the signed change can give (it cancels)."""
    torch.manual_seed(0)
    moving = SegPrompter(in_dim=48, token_dim=64, grid_hw=4, nhead=2, feat_hw=16,
                         motion_keys=True).eval()
    missing, unexpected = moving.load_state_dict(prompter.state_dict(), strict=False)
    assert sorted(missing) == ["motion_proj.0.bias", "motion_proj.0.weight",
                               "motion_proj.2.bias", "motion_proj.2.weight"] and not unexpected
    seg, img = torch.randn(1, 10, 48), torch.randn(1, 5, 64, 16, 16)
    assert torch.equal(moving(seg, img), prompter(seg, img))
    with torch.no_grad():
        moving.motion_proj[2].weight.normal_(0, 0.2)
        change = torch.randn(64)
        both = moving.motion_proj(torch.stack([change, -change, torch.zeros(64)]))
        assert (both[0] + both[1] - 2 * both[2]).abs().max() > 1e-2
    assert not torch.allclose(moving(seg, img), prompter(seg, img), atol=1e-3)
