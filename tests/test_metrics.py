"""Metric conventions that change published numbers, checked against hand-computed values."""

import numpy as np
import pytest

from benchmarks.scorer import boundary_f_scipy
from benchmarks.scorer import masks as random_masks
from virst.eval.metrics import (
    boundary_f,
    region_similarity,
    revos_accuracy,
    revos_robustness,
    seg2bmap,
    sequence_jf,
    tolerance_radius,
)
from virst.eval.scoring import ExpressionScore, summarize


def cols(h, w, upto):
    m = np.zeros((h, w), bool)
    m[:, :upto] = True
    return m


def test_empty_and_one_empty_frames():
    empty, obj = np.zeros((10, 10), bool), cols(10, 10, 4)
    assert region_similarity(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0
    assert region_similarity(obj, empty) == 0.0 and boundary_f(obj, empty) == 0.0
    assert region_similarity(empty, obj) == 0.0 and boundary_f(empty, obj) == 0.0


def test_seg2bmap_davis_convention():
    m = np.zeros((4, 4), bool)
    m[1, 1] = True
    want = np.zeros((4, 4), bool)
    want[0, 0] = want[0, 1] = want[1, 0] = want[1, 1] = True  # offset towards the origin
    assert np.array_equal(seg2bmap(m), want)
    left = cols(10, 10, 5)  # boundary: column 4, all rows
    assert np.array_equal(np.argwhere(seg2bmap(left))[:, 1], np.full(10, 4))


def test_full_frame_mask_has_an_empty_boundary():
    full = np.ones((9, 13), bool)
    assert not seg2bmap(full).any()
    assert boundary_f(full, full) == 1.0 and region_similarity(full, full) == 1.0
    assert boundary_f(full, cols(9, 13, 6)) == 0.0  # one boundary empty, the other not
    assert region_similarity(full, cols(9, 13, 6)) == pytest.approx(6 / 13)


def test_hand_computed_j_and_f():
    gt = cols(10, 10, 5)  # radius ceil(0.008 * 14.1) = 1
    assert tolerance_radius(10, 10) == 1
    assert region_similarity(gt, cols(10, 10, 6)) == pytest.approx(5 / 6)
    assert boundary_f(gt, cols(10, 10, 6)) == 1.0  # boundaries 1 px apart: matched
    assert boundary_f(gt, cols(10, 10, 7)) == 0.0  # 2 px apart: no match at all
    j, f, jf = sequence_jf(np.stack([gt, gt]), np.stack([gt, cols(10, 10, 7)]))
    assert (j, f, jf) == pytest.approx(((1 + 5 / 7) / 2, 0.5, ((1 + 5 / 7) / 2 + 0.5) / 2))


@pytest.mark.parametrize("h,w,radius", [(480, 854, 8), (101, 57, 1), (375, 499, 5),
                                        (1080, 1920, 18), (721, 1281, 12)])
def test_tolerance_radius_at_odd_sizes(h, w, radius):
    assert tolerance_radius(h, w) == radius
    gt = np.zeros((h, w), bool)
    gt[h // 4 : 3 * h // 4, w // 4 : w // 2] = True
    shifted = np.roll(gt, radius, axis=1)
    assert boundary_f(gt, shifted) == 1.0  # every boundary pixel within the radius
    assert boundary_f(gt, np.roll(gt, radius + 1, axis=1)) < 1.0


def test_255_and_1_inputs_and_any_nonzero_value_agree():
    rng = np.random.default_rng(0)
    gt = rng.random((3, 30, 40)) > 0.6
    pred = rng.random((3, 30, 40)) > 0.5
    for a, b in [(gt, pred), (gt * 255, pred * 1), (gt.astype(np.uint8) * 7, pred * 255)]:
        assert np.array_equal(region_similarity(a, b), region_similarity(gt, pred))
        assert np.array_equal(boundary_f(a, b), boundary_f(gt, pred))
        assert np.array_equal(revos_accuracy(a, b), revos_accuracy(gt, pred))


def test_void_pixels_are_ignored():
    gt = cols(20, 20, 10)
    pred = gt.copy()
    pred[:, 15:] = True  # wrong, but only inside the void region
    void = np.zeros_like(gt)
    void[:, 14:] = True
    assert region_similarity(gt, pred) < 1 and region_similarity(gt, pred, void) == 1.0
    assert boundary_f(gt, pred) < 1 and boundary_f(gt, pred, void) == 1.0


def test_revos_accuracy_and_robustness():
    gt = np.zeros((10, 10), bool)
    gt[0:2, :] = True  # 20 px
    pred = np.zeros_like(gt)
    pred[0, :] = True  # 10 px right, 10 missed
    pred[5, :5] = True  # 5 false positives
    fg = np.zeros_like(gt)
    fg[0:5, :] = True  # 50 px of annotated objects in the frame
    assert revos_accuracy(gt, pred) == pytest.approx(0.85)
    assert revos_robustness(gt, pred, fg) == pytest.approx(0.9, abs=1e-6)
    pred[3:, :] = True  # 70 false positives: 1 - 70 / 50 < 0 -> clipped at 0
    assert revos_robustness(gt, pred, fg) == pytest.approx(0.0, abs=1e-6)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="differ in shape"):
        region_similarity(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(T, H, W\)"):
        boundary_f(np.zeros(4), np.zeros(4))


def test_fast_boundary_f_equals_the_plain_scipy_definition():
    gt, pred = random_masks(6, 97, 131, seed=3)
    assert np.array_equal(boundary_f(gt, pred),
                          np.array([boundary_f_scipy(g, p) for g, p in zip(gt, pred)]))


def test_revos_aggregation_rounds_per_expression_and_excludes_type_2():
    def s(key, t, j, f):
        return ExpressionScore(key, t, j, f, A=j, R=f)

    scores = [s("a", 0, 0.5, 0.6), s("b", 0, 0.7, 0.8), s("c", 1, 0.123456, 0.2),
              s("d", 2, 0.0, 0.0)]
    table = summarize("revos", scores)
    assert table["referring"]["J"] == pytest.approx(60.0)
    assert table["referring"]["J&F"] == pytest.approx(65.0)
    assert table["reasoning"]["J"] == pytest.approx(12.35)  # rounded before the mean
    assert table["overall"]["J"] == pytest.approx((60 + 12.35) / 2)
    assert table["overall"]["J&F"] == pytest.approx((65 + (12.35 + 20) / 2) / 2)
    assert table["overall"]["expressions"] == 3
    plain = summarize("mevis", scores)["all"]
    assert plain["J"] == pytest.approx(100 * (0.5 + 0.7 + 0.123456) / 4)
