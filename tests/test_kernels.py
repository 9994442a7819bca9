"""Triton kernels against the reference, run by the Triton interpreter on CPU (small, odd
shapes) and compiled for real on a GPU (marked `gpu`).

Tolerances: fp32 max abs error <= 1e-5 against the fp32 reference; fp16/bf16 error against
the fp32 reference at most 2x that of torch computing in the same dtype (RoPE rounded once,
then SDPA in that dtype), plus 1e-6 for cases where torch is exact."""

import pytest
import torch
import torch.nn.functional as F

from virst_kernels.rope3d import rope3d, rope3d_reference
from virst_kernels.stf_attention import stf_attention_reference, stf_cross_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def qkv(b, h, n, t, g, d=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n * t, d, generator=gen)
    k = torch.randn(b, h, g * g * t, d, generator=gen)
    v = torch.randn(b, h, g * g * t, d, generator=gen)
    return (x.to(DEVICE, dtype) for x in (q, k, v))


@pytest.mark.parametrize("kind,frames,grid", [("key", 3, 4), ("key", 5, 3), ("query", 7, 8)])
def test_rope3d_kernel_equals_reference(kind, frames, grid):
    s = frames * grid * grid if kind == "key" else 3 * frames
    x = torch.randn(2, 3, s, 32, device=DEVICE)
    ours, ref = rope3d(x, frames, grid, kind), rope3d_reference(x, frames, grid, kind)
    assert (ours - ref).abs().max() < 1e-5


def test_rope3d_rejects_bad_shapes():
    with pytest.raises(ValueError, match="tokens"):
        rope3d(torch.randn(1, 10, 32), 3, 2, "key")
    with pytest.raises(ValueError, match="power of two"):
        rope3d(torch.randn(1, 12, 24), 3, 2, "query")


CASES = [  # (B, H, N, T, grid, split_kv)
    (1, 2, 1, 1, 2, 1), (2, 1, 3, 5, 3, 1), (1, 2, 2, 8, 4, 3), (1, 1, 3, 7, 2, 2),
]


@pytest.mark.parametrize("b,h,n,t,g,split", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_fused_attention_fp32(b, h, n, t, g, split, masked):
    q, k, v = qkv(b, h, n, t, g)
    mask = None
    if masked:
        mask = torch.zeros(b, g * g * t, dtype=torch.bool, device=DEVICE)
        mask[:, ::3] = True
    out, score = stf_cross_attention(q, k, v, t, grid_hw=g, key_padding_mask=mask,
                                     return_frame_score=True, split_kv=split)
    ref, ref_score = stf_attention_reference(q, k, v, t, grid_hw=g, key_padding_mask=mask)
    assert (out - ref).abs().max() <= 1e-5
    assert (score - ref_score).abs().max() <= 1e-6
    assert torch.allclose(score.sum(-1), torch.full((b,), 1 / (g * g), device=DEVICE))
    plain = stf_cross_attention(q, k, v, t, grid_hw=g, key_padding_mask=mask, split_kv=split)
    assert torch.equal(plain, out)


def _same_dtype_torch(q, k, v, t, g):
    """Torch computing in the input dtype: RoPE rounded once, then SDPA in that dtype."""
    qr = rope3d_reference(q, t, g, "query")
    kr = rope3d_reference(k, t, g, "key")
    return F.scaled_dot_product_attention(qr, kr, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,n,t,g,split", CASES[1:])
def test_fused_attention_low_precision(dtype, b, h, n, t, g, split):
    q, k, v = qkv(b, h, n, t, g, dtype=dtype, seed=1)
    ref, _ = stf_attention_reference(q.float(), k.float(), v.float(), t, grid_hw=g)
    out = stf_cross_attention(q, k, v, t, grid_hw=g, split_kv=split)
    assert out.dtype == dtype
    ours = (out.float() - ref).abs().max().item()
    torch_err = (_same_dtype_torch(q, k, v, t, g).float() - ref).abs().max().item()
    assert ours <= 2 * torch_err + 1e-6, (ours, torch_err)


def test_fully_masked_rows_give_zeros_where_the_reference_gives_nan():
    q, k, v = qkv(1, 1, 2, 3, 2)
    mask = torch.ones(1, 12, dtype=torch.bool, device=DEVICE)
    out = stf_cross_attention(q, k, v, 3, grid_hw=2, key_padding_mask=mask, split_kv=2)
    ref, _ = stf_attention_reference(q, k, v, 3, grid_hw=2, key_padding_mask=mask)
    assert torch.isnan(ref).all() and torch.equal(out, torch.zeros_like(out))


def test_bad_shapes_are_refused():
    q, k, v = qkv(1, 1, 2, 3, 2)
    with pytest.raises(ValueError, match="N\\*T"):
        stf_cross_attention(q, k, v, 4, grid_hw=2)
    with pytest.raises(ValueError, match="key_padding_mask"):
        stf_cross_attention(q, k, v, 3, grid_hw=2, key_padding_mask=torch.zeros(1, 5).bool())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_on_gpu(dtype):
    q, k, v = qkv(2, 8, 10, 32, 8, dtype=dtype)
    ref, ref_score = stf_attention_reference(q.float(), k.float(), v.float(), 32)
    for split in (None, 1):
        out, score = stf_cross_attention(q, k, v, 32, return_frame_score=True, split_kv=split)
        tol = 1e-5 if dtype == torch.float32 else 2 * (
            _same_dtype_torch(q, k, v, 32, 8).float() - ref).abs().max().item() + 1e-6
        assert (out.float() - ref).abs().max() <= tol
        assert (score - ref_score).abs().max() <= 1e-4


def test_segprompter_switch_same_weights_same_outputs():
    from virst.stf import SegPrompter, set_stf_backend

    torch.manual_seed(0)
    p = SegPrompter(in_dim=48, token_dim=64, grid_hw=4, nhead=2, feat_hw=16).eval().to(DEVICE)
    seg, img = torch.randn(1, 3, 48, device=DEVICE), torch.randn(1, 5, 64, 16, 16, device=DEVICE)
    try:
        set_stf_backend("reference")
        with torch.no_grad():
            ref, ref_score = p(seg, img, return_frame_score=True)
        set_stf_backend("triton")
        with torch.no_grad():
            out, score = p(seg, img, return_frame_score=True)
        with torch.enable_grad():  # no backward in the kernel: training takes the reference
            seg.requires_grad_(True)
            assert torch.equal(p(seg, img), p(seg, img))
    finally:
        set_stf_backend("auto")
    assert (out - ref).abs().max() <= 1e-5 and (score - ref_score).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="unknown STF backend"):
        set_stf_backend("cuda")
