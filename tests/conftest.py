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


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A `Runtime` sets torch's thread count for its process (on purpose); tests share one
    process, so each test gets the count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny model whose occlusion head says "present", so masks are real logits."""
    from virst.model import VirstModel

    model = VirstModel.from_preset("tiny", seed=0)
    with torch.no_grad():
        model.sam2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 1.0
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def fp32(tiny_dir, tmp_path_factory):
    """fp32 artifacts of `tiny_dir`: (folder, manifest, verification checks)."""
    from export.build import build

    out = tmp_path_factory.mktemp("fp32")
    manifest, checks = build("fp32", out, str(tiny_dir), tensorrt=False, progress=False)
    return out, manifest, checks


def truncated_avi(folder, frames: int = 40, keep: float = 0.3, size=(96, 128)):
    """An MPEG-4 AVI of `frames` moving-square frames cut to `keep` of its bytes: its
    header still declares `frames` frames (as a copy interrupted half-way does)."""
    import av
    import numpy as np

    path = folder / "clip.avi"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.bit_rate = 8_000_000  # noise frames of real size, so 30 % cuts into the data
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            img = np.random.default_rng(t).integers(0, 60, (*size, 3), dtype=np.uint8)
            img[10:30, t % 40 : t % 40 + 20] = (220, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = path.read_bytes()
    cut = folder / "cut.avi"
    cut.write_bytes(data[: int(len(data) * keep)])
    return cut
