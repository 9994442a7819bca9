"""`virst convert` on a synthetic checkpoint in the release's layout, built from our own
tiny modules with LoRA factors, plus base-weight fallbacks."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from virst.checkpoint import ROUTES, convert, merge_lora, strip_wrappers
from virst.config import preset
from virst.errors import CheckpointError
from virst.model import VirstModel
from virst.prompt import TINY_TOKENIZER_DIR

LORA_PROJ = ("q_proj", "v_proj", "down_proj")


def official_name(ours: str) -> str:
    for official, mine in ROUTES:
        if ours.startswith(mine):
            return official + ours[len(mine):]
    raise AssertionError(ours)


def release_blob(model, rank=4, alpha=16.0, base_layer=True, seed=0):
    """Our weights as the release stores them: PEFT-wrapped names, LoRA factors beside
    un-merged base weights; returns the blob and the merged reference state."""
    gen = torch.Generator().manual_seed(seed)
    merged, blob = {}, {}
    for name, t in model.state_dict().items():
        off = official_name(name)
        lora = name.startswith("vlm.llm.layers.") and name.endswith(".weight") and any(
            f".{p}." in name for p in LORA_PROJ)
        if lora:
            module = off[: -len(".weight")]
            a = torch.randn(rank, t.shape[1], generator=gen) * 0.1
            b = torch.randn(t.shape[0], rank, generator=gen) * 0.1
            blob[f"module.base_model.model.{module}.lora_A.default.weight"] = a
            blob[f"module.base_model.model.{module}.lora_B.default.weight"] = b
            stem = f"{module}.base_layer" if base_layer else module
            blob[f"module.base_model.model.{stem}.weight"] = t.clone()
            merged[name] = t + alpha / rank * b @ a
        else:
            blob[f"module.base_model.model.{off}"] = t.clone()
            merged[name] = t.clone()
    blob["module.base_model.model.model.occ_predictor.weight"] = torch.zeros(1, 64)
    return {"model_state_dict": blob}, merged


@pytest.fixture(scope="module")
def tiny():
    model = VirstModel.from_preset("tiny", seed=3)
    with torch.no_grad():
        model.sam2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 1.0
    return model


def test_convert_merges_lora_and_reproduces_the_merged_model(tiny, tmp_path):
    blob, merged = release_blob(tiny, base_layer=True)
    # the release lacks the SAM2 image encoder and the projector: base weights fill them
    sam_base = {"model": {k[len("sam2."):]: v for k, v in merged.items()
                          if k.startswith("sam2.image_encoder.")}}
    vc_base = {official_name(k): v for k, v in merged.items()
               if k.startswith("vlm.mm_projector.")}
    for k in list(blob["model_state_dict"]):
        if ".seg_model.image_encoder." in k or ".mm_projector." in k:
            del blob["model_state_dict"][k]
    torch.save(blob, tmp_path / "release.pt")
    torch.save(sam_base, tmp_path / "sam2.pt")
    (tmp_path / "vc").mkdir()
    save_file(vc_base, str(tmp_path / "vc" / "model.safetensors"))
    (tmp_path / "vc" / "tokenizer.json").write_text(
        (TINY_TOKENIZER_DIR / "tokenizer.json").read_text())
    table = convert(tmp_path / "release.pt", tmp_path / "out", videochat=tmp_path / "vc",
                    sam2=tmp_path / "sam2.pt", config=preset("tiny"))
    assert "LoRA modules merged: 6" in table and "unused release tensors: 1" in table
    assert "sam2" in table.splitlines()[0]
    converted = VirstModel.from_pretrained(tmp_path / "out")
    reference = VirstModel(preset("tiny"), tiny.tokenizer).eval()
    reference.load_state_dict(merged)
    frames = np.random.default_rng(0).integers(0, 255, (10, 48, 64, 3), dtype=np.uint8)
    a = converted.segment(frames, "the red circle", return_logits=True)
    b = reference.segment(frames, "the red circle", return_logits=True)
    assert np.allclose(a, b, atol=1e-5)
    c = tiny.segment(frames, "the red circle", return_logits=True)
    assert not np.allclose(a, c, atol=1e-3)  # the LoRA update really is in the weights


def test_plain_weight_form_and_merge_formula():
    w = torch.randn(6, 5)
    a, b = torch.randn(2, 5), torch.randn(6, 2)
    state = {"base_model.model.model.layers.0.mlp.up_proj.weight": w,
             "base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight": a,
             "base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight": b}
    plain, n = merge_lora(state, alpha=16)
    assert n == 1
    assert torch.allclose(plain["model.layers.0.mlp.up_proj.weight"], w + 8 * b @ a)
    assert strip_wrappers("module.base_model.model.lm_head.weight") == "lm_head.weight"


def test_missing_and_mismatched_tensors_are_named(tiny, tmp_path):
    blob, _ = release_blob(tiny)
    sd = blob["model_state_dict"]
    del sd["module.base_model.model.model.seg_prompter.seg_proj.weight"]
    torch.save(blob, tmp_path / "r.pt")
    with pytest.raises(CheckpointError, match="1 tensors have no source: seg_prompter.seg_proj"):
        convert(tmp_path / "r.pt", tmp_path / "o", config=preset("tiny"))
    blob, _ = release_blob(tiny)
    blob["model_state_dict"]["module.base_model.model.model.norm.weight"] = torch.ones(3)
    torch.save(blob, tmp_path / "r.pt")
    with pytest.raises(CheckpointError, match=r"vlm.llm.norm.weight \(3,\) != \(128,\)"):
        convert(tmp_path / "r.pt", tmp_path / "o", config=preset("tiny"))
    torch.save({"state_dict": {}}, tmp_path / "r.pt")
    with pytest.raises(CheckpointError, match="no 'model_state_dict'"):
        convert(tmp_path / "r.pt", tmp_path / "o", config=preset("tiny"))
    (tmp_path / "r.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read"):
        convert(tmp_path / "r.pt", tmp_path / "o", config=preset("tiny"))
    assert not (tmp_path / "o").exists()  # nothing written on failure
