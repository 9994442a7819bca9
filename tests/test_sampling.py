"""Frame sampling tables (DESIGN.md section 1, item 1)."""

import numpy as np

from virst.config import preset
from virst.sampling import plan_frames, seg_positions, vlm_frame_count, vlm_frames

CFG = preset("virst-7b")


def test_vlm_frame_count_table():
    table = {1: 8, 5: 8, 8: 8, 9: 8, 11: 8, 12: 12, 15: 12, 16: 16, 63: 60, 64: 64, 65: 64,
             1000: 64}
    for length, n in table.items():
        assert vlm_frame_count(length, CFG) == n, length


def test_vlm_frames_are_segment_centres_and_short_videos_pad_with_the_last_frame():
    assert vlm_frames(5, CFG) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert vlm_frames(8, CFG) == list(range(8))
    assert vlm_frames(16, CFG) == list(range(16))
    # 100 frames, 64 segments: edges floor(i * 100 / 64), centre of each [a, b)
    edges = np.linspace(0, 100, 65, dtype=int)
    frames = vlm_frames(100, CFG)
    assert frames == [(a + b) // 2 for a, b in zip(edges[:-1], edges[1:])]
    assert all(a <= f < b for f, a, b in zip(frames, edges[:-1], edges[1:]))
    assert frames[:4] == [0, 2, 3, 5] and frames[-1] == 99


def test_segmentation_frames_and_anchors():
    assert seg_positions(64, CFG) == list(range(0, 64, 2))
    assert seg_positions(8, CFG) == list(range(8))
    assert seg_positions(60, CFG)[:3] == [0, 1, 3]
    plan = plan_frames(200, CFG)
    assert len(plan.vlm) == 64 and len(plan.seg) == 32
    assert plan.anchor_positions == (0, 4, 9, 13, 18, 22, 27, 31)
    assert list(plan.anchor_frames) == [plan.seg[p] for p in plan.anchor_positions]
    short = plan_frames(3, CFG)  # 8 VLM frames (padded), T_seg 8, 2 anchors
    assert short.seg == (0, 1, 2, 2, 2, 2, 2, 2) and short.anchor_positions == (0, 7)
    assert short.anchor_frames == {0: 0, 2: 7}


def test_seeded_random_sampling_is_reproducible_and_stays_in_segments():
    a, b = plan_frames(300, CFG, seed=3), plan_frames(300, CFG, seed=3)
    assert a == b and a != plan_frames(300, CFG)
    edges = np.linspace(0, 300, 65, dtype=int)
    assert all(lo <= f < hi for f, lo, hi in zip(a.vlm, edges[:-1], edges[1:]))
    assert len(set(a.seg)) == 32 and list(a.seg) == sorted(a.seg)
