"""SAM2 steps on the exported units through ONNX Runtime: the stitched check routes every
SAM2 call of the reference pipeline (`VirstModel.segment(..., sam2_steps=...)`) through
the artifacts, keeping the memory selection and everything else in the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from export.manifest import load_manifest
from virst.tdau import FrameOutput, MemoryPlan, gather_memory


@dataclass
class OrtFeatures:
    level2: torch.Tensor  # (1, C, h, w)
    high_res0: torch.Tensor
    high_res1: torch.Tensor


class _Constants(nn.Module):
    """The SAM2 constants `gather_memory` reads, from constants.safetensors."""

    def __init__(self, tensors: dict, cfg: dict):
        super().__init__()
        self.maskmem_tpos_enc = tensors["maskmem_tpos_enc"]
        self.num_maskmem = cfg["num_maskmem"]
        self.hidden_dim, self.mem_dim = cfg["sam_dim"], cfg["mem_dim"]
        self.max_obj_ptrs_in_encoder = cfg["max_obj_ptrs"]
        w, b = tensors["obj_ptr_tpos_proj.weight"], tensors["obj_ptr_tpos_proj.bias"]
        self.obj_ptr_tpos_proj = nn.Linear(w.shape[1], w.shape[0])
        self.obj_ptr_tpos_proj.load_state_dict({"weight": w, "bias": b})


class OrtSam2Steps:
    def __init__(self, folder: str | Path, bf16_storage: bool = True):
        import onnxruntime as ort

        folder = Path(folder)
        manifest = load_manifest(folder)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3

        def session(name):
            files = [f for f in manifest["artifacts"][name]["files"] if f.endswith(".onnx")]
            return ort.InferenceSession(str(folder / files[0]), opts,
                                        providers=["CPUExecutionProvider"])

        self.encoder, self.anchor_decoder = session("image_encoder"), session(
            "mask_decoder_anchor")
        self.track_decoder, self.memory_attention = session("mask_decoder_track"), session(
            "memory_attention")
        self.memory_encoder = session("memory_encoder")
        cfg = manifest["config"]
        constants = load_file(str(folder / "constants.safetensors"))
        self.consts = _Constants(constants, cfg)
        self.maskmem_pos = constants["maskmem_pos"]
        self.num_maskmem = cfg["num_maskmem"]
        self.max_anchors, self.max_obj_ptrs = cfg["max_anchors_in_attn"], cfg["max_obj_ptrs"]
        self.bf16_storage = bf16_storage

    @staticmethod
    def _run(sess, **feeds) -> list[torch.Tensor]:
        outs = sess.run(None, {k: v.detach().cpu().numpy().astype(np.float32)
                               for k, v in feeds.items()})
        return [torch.from_numpy(o).float() for o in outs]

    def encode(self, pixels: torch.Tensor) -> list[OrtFeatures]:
        level2, hr0, hr1 = self._run(self.encoder, pixels=pixels)
        return [OrtFeatures(level2[b : b + 1], hr0[b : b + 1], hr1[b : b + 1])
                for b in range(pixels.shape[0])]

    def _finish(self, feats: OrtFeatures, logits, ious, score, ptr) -> FrameOutput:
        (maskmem,) = self._run(self.memory_encoder, features=feats.level2, mask_logits=logits,
                               obj_score=score)
        if self.bf16_storage:
            maskmem = maskmem.to(torch.bfloat16)
        return FrameOutput(maskmem, self.maskmem_pos, ptr, logits, score, ious)

    def anchor(self, feats: OrtFeatures, prompt: torch.Tensor) -> FrameOutput:
        outs = self._run(self.anchor_decoder, features=feats.level2, high_res0=feats.high_res0,
                         high_res1=feats.high_res1, prompt=prompt)
        return self._finish(feats, *outs)

    def track(self, feats: OrtFeatures, plan: MemoryPlan, bank: dict[int, FrameOutput],
              num_frames: int) -> FrameOutput:
        memory, pos, n_ptr = gather_memory(self.consts, plan, bank, num_frames, torch.float32)
        spatial = memory.shape[0] - n_ptr
        memory, pos = memory.transpose(0, 1), pos.transpose(0, 1)  # (M, 1, C) -> (1, M, C)
        (conditioned,) = self._run(
            self.memory_attention, features=feats.level2, memory=memory[:, :spatial],
            memory_pos=pos[:, :spatial], pointers=memory[:, spatial:],
            pointer_pos=pos[:, spatial:])
        outs = self._run(self.track_decoder, features=conditioned, high_res0=feats.high_res0,
                         high_res1=feats.high_res1)
        return self._finish(feats, *outs)
