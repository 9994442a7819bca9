"""`VirstModel`: the whole reference pipeline, one video and one expression at a time.

    frames -> VLM frames -> UMT + ToMe -> Qwen2 prefill -> 10 [SEG] hidden states
    frames -> SAM2 image encoder (segmentation frames) -> SegPrompter -> a prompt per frame
    anchors (predicted from their prompts) -> SAM2 memory propagation over every frame
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn
from tqdm.auto import tqdm

from virst.config import VirstConfig, preset
from virst.errors import CheckpointError
from virst.files import save_tensors
from virst.media import Video, load_video
from virst.preprocess import to_model_input
from virst.prompt import (
    SEG_TOKEN,
    TINY_TOKENIZER_DIR,
    Prompt,
    build_prompt,
    load_tokenizer,
    placeholder_tokenizer,
)
from virst.sam2_model import build_sam2
from virst.sampling import FramePlan, plan_frames
from virst.stf import InitialSegFusion, SegPrompter, stf_prompts
from virst.tdau import FrameFeatures, TorchSam2Steps, propagate
from virst.vlm import VideoLLM

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
# tensors a config option adds that start as a no-op (a zero projection): switching the
# option on for a trained model keeps its part instead of restarting it
NO_OP_ADDITIONS = ("seg_prompter.motion_proj.",)


def _drop_stale_additions(state: dict, expected: dict) -> dict:
    """The folder's tensors without those of a no-op addition whose names or shapes differ
    from the model's (the motion projection, once a single linear map). An addition the
    model no longer has is kept: removing trained tensors restarts their part."""
    stale = set()
    for prefix in NO_OP_ADDITIONS:
        old = {k: v.shape for k, v in state.items() if k.startswith(prefix)}
        new = {k: v.shape for k, v in expected.items() if k.startswith(prefix)}
        if old and new and old != new:
            stale |= set(old)
    return {k: v for k, v in state.items() if k not in stale}


@contextlib.contextmanager
def init_empty_weights():
    """Build modules with parameters on the meta device: no memory, no initialisation cost."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class FrameEncoder:
    """SAM2 image features on demand, encoded `batch` frames at a time by `steps.encode`.

    Frames in `keep` stay cached (the segmentation frames are read twice: by the
    SegPrompter and as anchors); any other frame is dropped once it has been served.
    """

    def __init__(self, steps, frames: np.ndarray, cfg: VirstConfig, device, keep=(),
                 batch: int = 4, dtype: torch.dtype = torch.float32):
        self.steps, self.frames, self.cfg, self.batch = steps, frames, cfg, batch
        self.keep, self.cache, self.device, self.dtype = set(keep), {}, device, dtype

    def _encode(self, idx: list[int]) -> None:
        pixels = to_model_input(self.frames[idx], self.cfg.sam_image_size, self.cfg.sam_resize,
                                self.device, self.dtype)
        self.cache.update(zip(idx, self.steps.encode(pixels)))

    def many(self, idx) -> list[FrameFeatures]:
        todo = sorted(set(idx) - set(self.cache))
        for i in range(0, len(todo), self.batch):
            self._encode(todo[i : i + self.batch])
        return [self.cache[i] for i in idx]

    def __call__(self, t: int) -> FrameFeatures:
        if t not in self.cache:
            ahead = range(t, min(t + self.batch, len(self.frames)))
            self._encode([i for i in ahead if i not in self.cache])
        return self.cache[t] if t in self.keep else self.cache.pop(t)


class VirstModel(nn.Module):
    def __init__(self, config: VirstConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.config = cfg = config
        self.vlm = VideoLLM(cfg)
        self.sam2 = build_sam2(cfg)
        self.seg_prompter = SegPrompter(
            cfg.llm_hidden, cfg.sam_dim, cfg.stf_grid, cfg.stf_heads, cfg.stf_layers,
            feat_hw=cfg.sam_feat_size, max_frames=cfg.stf_max_frames,
            motion_keys=cfg.stf_motion_keys,
        )
        self.initial_seg_fusion = InitialSegFusion(
            cfg.llm_hidden, cfg.sam_dim, cfg.sam_dim, cfg.stf_grid, cfg.fusion_heads,
            feat_hw=cfg.sam_feat_size,
        )
        self.tokenizer = tokenizer
        if tokenizer is not None:
            check_tokenizer(tokenizer, cfg)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, seed: int = 0, device: str | torch.device = "cpu",
                    **overrides) -> VirstModel:
        """Randomly initialised (seeded) model, built on `device`. The tiny preset brings
        its tokenizer; others get a word-level placeholder whose [SEG] has the preset's id
        (random weights: for speed and memory runs, not for reading real text)."""
        cfg = preset(name, **overrides)
        tokenizer = (load_tokenizer(TINY_TOKENIZER_DIR) if cfg.preset == "tiny"
                     else placeholder_tokenizer(cfg))
        return cls._seeded(cfg, tokenizer, seed, device).eval()

    @classmethod
    def _seeded(cls, cfg, tokenizer, seed: int, device) -> VirstModel:
        """Built on `device` from `seed`, leaving the caller's random state as it was."""
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            return cls(cfg, tokenizer)

    def save_pretrained(self, folder: str | Path) -> None:
        """config.json + model.safetensors (+ tokenizer.json), replaced as a whole."""
        out = Path(folder)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            self.config.save(tmp / CONFIG)
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_tensors(state, tmp / WEIGHTS, metadata={"format": "pt", "virst": "1"})
            if self.tokenizer is not None:
                self.tokenizer.save(str(tmp / TOKENIZER))
            out.mkdir(exist_ok=True)
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def check_folder(folder: str | Path) -> Path:
        """A model folder with its files present (checked before any work starts)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"model folder {folder} does not exist")
        for name in (CONFIG, WEIGHTS):
            if not (folder / name).is_file():
                raise CheckpointError(f"model folder {folder} has no {name}")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> VirstModel:
        cfg, tokenizer, state = cls._read_folder(folder, device)
        model = cls(cfg, tokenizer)
        load_checked(model, state, source=str(Path(folder) / WEIGHTS))
        return model.to(device).eval()

    @classmethod
    def _read_folder(cls, folder, device):
        folder = cls.check_folder(folder)
        cfg = VirstConfig.load(folder / CONFIG)
        tokenizer = load_tokenizer(folder) if (folder / TOKENIZER).is_file() else None
        try:
            state = load_file(str(folder / WEIGHTS), device=str(device))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {folder / WEIGHTS}: {err}") from err
        return cfg, tokenizer, state

    @classmethod
    def from_pretrained_changed(cls, folder: str | Path, device: str | torch.device = "cpu",
                                seed: int = 0, **changes) -> tuple[VirstModel, list[str]]:
        """The folder's model with config fields changed (`virst train --init F --set K=V`):
        a part (seg_prompter, sam2, ...) whose tensors the change reshapes, adds or removes
        starts fresh as a whole; the others load. Tensors that start as a no-op
        (`NO_OP_ADDITIONS`) are added without restarting their part. Returns the model and
        the fresh parts (refused when every part changed). A no-op addition whose layout
        changed since the folder was written restarts at its no-op start alone."""
        cfg, tokenizer, state = cls._read_folder(folder, device)
        model = cls._seeded(cfg.replace(**changes), tokenizer, seed, device)
        expected = model.state_dict()
        state = _drop_stale_additions(state, expected)
        added = {k for k in set(expected) - set(state) if not k.startswith(NO_OP_ADDITIONS)}
        changed = added | (set(state) - set(expected))
        changed |= {k for k, v in expected.items() if k in state and state[k].shape != v.shape}
        fresh = sorted({k.split(".")[0] for k in changed})
        kept = {k: v for k, v in state.items() if k.split(".")[0] not in fresh}
        if not kept:
            raise CheckpointError(f"{folder}: no part of the model survives {changes}")
        model.load_state_dict(kept, strict=False)
        return model.to(device).eval(), fresh

    def forward(self, sample, mode: str, scratch_losses: bool = False) -> dict:
        """One training sample's losses (`virst.train.step.forward_losses`): the call DDP
        and FSDP2 wrap, so that their hooks see every training forward."""
        from virst.train.step import forward_losses

        return forward_losses(self, sample, mode, scratch_losses)

    # ---------------------------------------------------------------------- inference
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (a bf16 or fp16 model reads its inputs in it)."""
        return next(self.parameters()).dtype

    def prefill(self, prompts: Prompt | list[Prompt], video_tokens: torch.Tensor,
                seg_features: torch.Tensor | None, full: bool = False
                ) -> tuple[torch.Tensor, list[int] | list[list[int]]]:
        """Final hidden states (E, L, hidden) of one prefill of E prompts (right-padded: with
        causal attention no real position sees the padding) and their [SEG] positions. One
        `Prompt` gives (1, L, hidden) and its positions.

        Inference stops at the last [SEG] (`full=False`); the trainer needs the whole answer.
        """
        single = isinstance(prompts, Prompt)
        prompts = [prompts] if single else prompts
        embeds = [self.vlm.embed_prompt(p, video_tokens, full=full)[0] for p in prompts]
        positions = [p.seg_positions(video_tokens.shape[0]) for p in prompts]
        if self.config.initial_seg_fusion:
            embeds = [e.clone() for e in embeds]
            for e, pos in zip(embeds, positions):
                e[pos] = self.initial_seg_fusion(e[pos][None], seg_features)[0]
        batch = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)
        hidden = self.vlm.hidden_states(batch)
        return (hidden, positions[0]) if single else (hidden, positions)

    def stf_prompts(self, seg_hidden: torch.Tensor, seg_features: torch.Tensor,
                    return_attention: bool = False):
        """(B, P, T_seg, C) anchor prompts from the [SEG] states (`stf.stf_prompts`)."""
        clicks = self.sam2.sam_prompt_encoder if self.config.stf_point_prompt else None
        return stf_prompts(self.seg_prompter, seg_hidden, seg_features, clicks, return_attention,
                           self.config.stf_click_power)

    def frame_prompts(self, video: Video, plan: FramePlan, prompt: Prompt,
                      frames: FrameEncoder) -> dict[int, torch.Tensor]:
        """The VLM + STF half: anchor video frame -> its (1, P, C) prompt tokens."""
        cfg = self.config
        pixels = to_model_input(video.frames[list(plan.vlm)], cfg.vlm_image_size,
                                cfg.vlm_resize, self.device, self.dtype)
        video_tokens = self.vlm.encode_video(pixels)
        seg_features = torch.cat([f.level2 for f in frames.many(plan.seg)])[None]
        hidden, positions = self.prefill(prompt, video_tokens, seg_features)
        prompts = self.stf_prompts(hidden[:, positions], seg_features)  # (1, P, T_seg, C)
        return {frame: prompts[:, :, pos] for frame, pos in plan.anchor_frames.items()}

    @torch.inference_mode()
    def segment(self, video, expression: str, *, return_logits: bool = False,
                seed: int | None = None, progress: bool = False) -> np.ndarray:
        """Masks (T, H, W) bool for every frame (logits float32 when `return_logits`).

        `video`: a frame folder, a video file, an (T, H, W, 3) array or a `Video`.
        `seed`: None for the deterministic frame choice, an int for the release's random one.
        This is the reference path (whole video in memory); `runtime/` is the fast one.
        """
        with low_precision(self):
            return self._segment(video, expression, return_logits, seed, progress)

    def _segment(self, video, expression, return_logits, seed, progress) -> np.ndarray:
        if self.tokenizer is None:
            raise CheckpointError("this model has no tokenizer: load one with from_pretrained")
        video = load_video(video)
        prompt = build_prompt(self.tokenizer, expression, self.config.num_seg_tokens)
        plan = plan_frames(len(video), self.config, seed)
        sam2_steps = TorchSam2Steps(self.sam2, self.config.memory_bf16_storage)
        frames = FrameEncoder(sam2_steps, video.frames, self.config, self.device, keep=plan.seg,
                              dtype=self.dtype)
        prompts = self.frame_prompts(video, plan, prompt, frames)
        return propagate_masks(sam2_steps, frames, prompts, video, return_logits, progress)


def low_precision(model: VirstModel):
    """Autocast to the weights' dtype when it is bf16/fp16 (a no-op for fp32), as SAM2 runs
    in bf16: SAM2 keeps masks, position encodings and point projections in fp32, and autocast
    gives each op the dtype SAM2 expects of it."""
    if model.dtype == torch.float32:
        return contextlib.nullcontext()
    # no cast cache: nothing here is trained, and a CUDA graph capture must not keep one
    return torch.autocast(model.device.type, dtype=model.dtype, cache_enabled=False)


def propagate_masks(sam2_steps, frames: FrameEncoder, prompts: dict[int, torch.Tensor],
                    video: Video, return_logits: bool = False, progress: bool = False):
    """Masks (T, H, W) of `video` from the anchors' prompts, SAM2 memory elsewhere."""
    out = np.zeros((len(video), *video.size), np.float32 if return_logits else bool)
    steps = propagate(sam2_steps, frames, prompts, len(video))
    for t, result in tqdm(steps, total=len(video), desc="segment", disable=not progress):
        logits = F.interpolate(result.low_res, size=video.size, mode="bilinear",
                               align_corners=False)[0, 0]
        out[t] = (logits.float() if return_logits else logits > 0).cpu().numpy()
    return out


# ---------------------------------------------------------------------------- checks


def check_tokenizer(tokenizer: Tokenizer, cfg: VirstConfig) -> None:
    seg = tokenizer.token_to_id(SEG_TOKEN)
    if seg != cfg.seg_token_id:
        raise CheckpointError(
            f"tokenizer maps {SEG_TOKEN} to {seg}, the config expects {cfg.seg_token_id}"
        )
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, the "
                              f"embedding only {cfg.vocab_size} rows")


def _listing(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, refusing missing, unexpected or mis-shaped tensors by name."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} with another shape: {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def parameter_table(model: VirstModel) -> list[tuple[str, int]]:
    """Parameter count per part, in pipeline order."""
    parts = [
        ("UMT video tower", model.vlm.vision_tower),
        ("ToMe projector", model.vlm.mm_projector),
        ("Qwen2 decoder (incl. embeddings)", model.vlm.llm),
        ("lm_head (training only)", model.vlm.lm_head),
        ("SAM2 image encoder", model.sam2.image_encoder),
        ("SAM2 memory attention", model.sam2.memory_attention),
        ("SAM2 memory encoder", model.sam2.memory_encoder),
        ("SAM2 prompt enc. + mask decoder", nn.ModuleList(
            [model.sam2.sam_prompt_encoder, model.sam2.sam_mask_decoder])),
        ("SegPrompter (STF stage 2)", model.seg_prompter),
        ("InitialSegFusion (STF stage 1)", model.initial_seg_fusion),
    ]
    rows = [(name, sum(p.numel() for p in m.parameters())) for name, m in parts]
    counted = sum(n for _, n in rows)
    total = sum(p.numel() for p in model.parameters())
    rows.append(("SAM2 pointers, embeddings, other", total - counted))
    rows.append(("total", total))
    return rows


def describe(config: VirstConfig) -> str:
    with init_empty_weights():
        model = VirstModel(config)
    rows = parameter_table(model)
    width = max(len(n) for n, _ in rows)
    lines = [f"{'part':<{width}}  {'parameters':>15}"]
    lines += [f"{n:<{width}}  {c:>15,}" for n, c in rows]
    return "\n".join(lines)
