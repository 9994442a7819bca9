import pytest
import torch

from virst.config import preset


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
