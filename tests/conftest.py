import os

import pytest
import torch

# Triton kernels run in the interpreter where there is no GPU; this must be set before
# anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from virst.config import preset  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_cfg():
    return preset("tiny")


def make_tiny_sam(cfg, object_bias: float = 1.0, seed: int = 0):
    """Random tiny SAM2; `object_bias` shifts the occlusion head so that random weights
    predict a present (> 0) or absent (< 0) object instead of hovering around 0."""
    from virst.sam2_model import build_sam2

    torch.manual_seed(seed)
    sam = build_sam2(cfg).eval()
    with torch.no_grad():
        sam.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += object_bias
    return sam


@pytest.fixture(scope="session")
def tiny_sam(tiny_cfg):
    return make_tiny_sam(tiny_cfg)
