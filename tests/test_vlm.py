"""VLM side: UMT position table, ToMe merging, the prompt and its [SEG] positions, prefill."""

import math

import numpy as np
import pytest
import torch

from virst.config import preset
from virst.errors import InputError
from virst.prompt import (
    TINY_TOKENIZER_DIR,
    build_prompt,
    build_word_tokenizer,
    load_tokenizer,
    placeholder_tokenizer,
    tiny_words,
)
from virst.tome import ToMeProjector, bipartite_merge, merge_schedule
from virst.umt import sinusoid_table, umt_position_table
from virst.vlm import VideoLLM


def test_sinusoid_table_formula():
    table = sinusoid_table(50, 16)
    for pos, j in [(0, 0), (7, 3), (49, 10), (13, 15)]:
        angle = pos / np.power(10000, 2 * (j // 2) / 16)
        want = math.sin(angle) if j % 2 == 0 else math.cos(angle)
        assert table[pos, j].item() == pytest.approx(want, abs=1e-6)


def test_umt_position_table_is_resized_per_frame_from_the_pretraining_grid():
    cfg = preset("virst-7b")
    table = umt_position_table(cfg)
    assert table.shape == (4 * 28 * 28, 1024)
    same = umt_position_table(cfg.replace(umt_pos_grid=28))
    assert torch.equal(same, sinusoid_table(4 * 28 * 28, 1024))
    # bicubic resize of each frame's 14x14 grid: the smooth (low-frequency) lanes keep
    # their values at the corners; the table is not a fresh 28x28 sinusoid
    src = sinusoid_table(4 * 14 * 14, 1024).view(4, 14, 14, 1024)
    dst = table.view(4, 28, 28, 1024)
    smooth = slice(600, 1024)
    for f in range(4):
        assert torch.allclose(dst[f, 0, 0, smooth], src[f, 0, 0, smooth], atol=1e-2)
        assert torch.allclose(dst[f, -1, -1, smooth], src[f, -1, -1, smooth], atol=1e-2)
    assert not torch.allclose(table, same, atol=1e-2)
    assert not torch.allclose(dst[1, 0, 0], dst[2, 0, 0])  # frames keep distinct positions


def test_tome_schedule_and_weighted_merge():
    assert merge_schedule(3136, 64) == [1568, 784, 392, 196, 98, 34]
    assert merge_schedule(196, 64) == [98, 34]
    torch.manual_seed(0)
    x = torch.randn(2, 20, 8)
    size = torch.ones(2, 20, 1)
    merged, new_size = bipartite_merge(x, size, 6, heads=2)
    assert merged.shape == (2, 14, 8) and new_size.sum() == 40
    # a size-weighted average conserves the feature mass
    assert torch.allclose((merged * new_size).sum(1), x.sum(1), atol=1e-5)
    # the 4 unmerged tokens of set A come first, then set B (10 tokens)
    a_tokens = x[:, ::2]
    for b in range(2):
        for tok in merged[b, :4]:
            assert any(torch.equal(tok, a) for a in a_tokens[b])
    proj = ToMeProjector(width=8, hidden=12, heads=2, tokens_per_clip=5)
    assert proj(torch.randn(3, 20, 8)).shape == (15, 12)


def test_prompt_seg_positions_and_truncation():
    tok = load_tokenizer(TINY_TOKENIZER_DIR)
    p = build_prompt(tok, "  The RED   circle ")
    text = tok.decode(list(p.before), skip_special_tokens=False)
    assert text.endswith("user reference image :")
    assert len(p.seg_index) == 10
    positions = p.seg_positions(video_tokens=128)
    assert positions[0] == len(p.before) + 128 + p.seg_index[0]
    assert [p.after[i] for i in p.seg_index] == [tok.token_to_id("[SEG]")] * 10
    assert p.inference_after[-1] == tok.token_to_id("[SEG]")
    assert len(p.after) > len(p.inference_after)  # ". <|im_end|>" is never computed
    assert "what is the red circle in the reference image" in tok.decode(list(p.after))
    long = build_prompt(tok, "Which circle stops first?")
    assert "please find it in the reference image" in tok.decode(list(long.after))
    with pytest.raises(InputError, match="empty"):
        build_prompt(tok, "   ")


def test_shipped_tiny_tokenizer_is_reproducible_from_its_word_list():
    shipped = load_tokenizer(TINY_TOKENIZER_DIR)
    rebuilt = build_word_tokenizer(tiny_words())
    assert shipped.get_vocab() == rebuilt.get_vocab()
    assert shipped.token_to_id("[SEG]") == preset("tiny").seg_token_id
    assert shipped.get_vocab_size() <= preset("tiny").vocab_size


def test_placeholder_tokenizer_gives_every_token_its_own_id():
    """Random-weight presets without their tokenizer: [SEG] at the preset's id, no id
    shared (a word on the <image> id would be read as a video token)."""
    cfg = preset("virst-7b")
    vocab = placeholder_tokenizer(cfg).get_vocab()
    assert len(set(vocab.values())) == len(vocab)
    assert vocab["[SEG]"] == cfg.seg_token_id and max(vocab.values()) < cfg.vocab_size


@torch.no_grad()
def test_prefill_reads_seg_states_that_the_truncated_tail_cannot_change():
    cfg = preset("tiny")
    torch.manual_seed(0)
    vlm = VideoLLM(cfg).eval()
    tok = load_tokenizer(TINY_TOKENIZER_DIR)
    p = build_prompt(tok, "the blue square")
    frames = torch.randn(8, 3, cfg.vlm_image_size, cfg.vlm_image_size)
    video = vlm.encode_video(frames)
    assert video.shape == (8 * cfg.tokens_per_frame, cfg.llm_hidden)
    short = vlm.hidden_states(vlm.embed_prompt(p, video))
    full = vlm.hidden_states(vlm.embed_prompt(p, video, full=True))
    pos = p.seg_positions(video.shape[0])
    assert short.shape[1] == pos[-1] + 1
    assert torch.allclose(short[0, pos], full[0, pos], atol=1e-5)
    # the final norm is applied: RMS of hidden states is of order 1, not of the residual
    rms = full[0].pow(2).mean(-1).sqrt()
    assert rms.max() < 10
