"""Triton kernels (STF cross-attention, RoPE3D). Not named `kernels`: that is the import name of
Hugging Face's kernels package, which transformers >= 5.25 requires."""
