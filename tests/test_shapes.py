"""The generated shapes benchmark: deterministic, unambiguous, in the ReVOS layout."""

import numpy as np

from virst.data.render import Shape, render
from virst.data.rvos import open_dataset
from virst.data.shapes import HEIGHT, WIDTH, expressions_for, make_video, measure, write_split
from virst.prompt import TINY_TOKENIZER_DIR, load_tokenizer


def test_videos_are_deterministic_and_have_both_expression_types():
    a, b = make_video("valid", 5), make_video("valid", 5)
    assert np.array_equal(a.frames, b.frames) and a.expressions == b.expressions
    assert not np.array_equal(make_video("test", 5).frames[0], a.frames[0])
    for i in range(12):
        v = make_video("valid", i)
        types = {t for _, _, t in v.expressions}
        assert types == {0, 1}
        assert 24 <= len(v.frames) <= 48 and v.frames.shape[1:] == (HEIGHT, WIDTH, 3)
        for _, objs, _ in v.expressions:  # every target is visible somewhere
            assert v.masks[objs].any()


def test_expressions_use_only_words_the_tiny_tokenizer_knows():
    tok = load_tokenizer(TINY_TOKENIZER_DIR)
    unk = tok.token_to_id("[UNK]")
    for i in range(40):
        for text, _, _ in make_video("train", i).expressions:
            assert unk not in tok.encode(text).ids, text


def test_reasoning_needs_motion_among_look_alikes():
    t = 30
    still = np.tile([[40.0, 40.0]], (t, 1))
    moving = np.stack([np.linspace(40, 180, t), np.full(t, 110.0)], 1)
    stopping = np.concatenate([moving[:12], np.repeat(moving[11:12], t - 12, 0)])
    shapes = [Shape("circle", "red", 12, still), Shape("circle", "red", 12, moving),
              Shape("circle", "red", 12, stopping + [0, -60]), Shape("star", "blue", 12, still)]
    frames, masks = render(shapes, HEIGHT, WIDTH, t, np.random.default_rng(0))
    exprs = {text: (objs, ty) for text, objs, ty in expressions_for(shapes, measure(shapes, masks))}
    assert exprs["the blue star"] == ([3], 0)
    assert exprs["the red circle that never moves"] == ([0], 1)
    assert exprs["the red circle that stops moving"] == ([2], 1)
    assert "the red circle" not in exprs  # three look-alikes: appearance alone is ambiguous


def test_hidden_behind_an_occluder_is_measured_from_the_masks():
    t = 30
    occluder = Shape("square", "green", 30, np.tile([[WIDTH / 2, HEIGHT / 2]], (t, 1)), 5)
    passing = Shape("circle", "red", 10, np.stack(
        [np.linspace(10, WIDTH - 10, t), np.full(t, HEIGHT / 2)], 1), 1)
    twin = Shape("circle", "red", 10, np.stack(
        [np.linspace(WIDTH - 10, 10, t), np.full(t, 20.0)], 1), 1)
    shapes = [occluder, passing, twin]
    frames, masks = render(shapes, HEIGHT, WIDTH, t, np.random.default_rng(0))
    facts = measure(shapes, masks)
    assert facts[1].hidden_by.get(0, 0) >= 3 and not facts[2].hidden_by
    exprs = {text: objs for text, objs, _ in expressions_for(shapes, facts)}
    assert exprs["the object that was hidden behind the green square"] == [1]


def test_written_split_reads_back_as_revos(tmp_path):
    write_split(tmp_path, "valid", 3, progress=False)
    ds = open_dataset("shapes", tmp_path, "valid")
    v = make_video("valid", 1)
    exprs = [e for e in ds.expressions if e.video == v.name]
    assert [e.text for e in exprs] == [t for t, _, _ in v.expressions]
    gt = ds.ground_truth(exprs[0])
    assert np.array_equal(gt, v.masks[v.expressions[0][1]].any(axis=0))
    fg = ds.foreground(exprs[0])
    assert np.array_equal(fg, v.masks.any(axis=0))
    frames = ds.load_video(exprs[0]).frames
    assert np.abs(frames.astype(int) - v.frames).mean() < 5  # JPEG, quality 95, noisy texture
