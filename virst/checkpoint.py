"""Import of the authors' released checkpoint (`virst convert`).

The release is `torch.load(ckpt)["model_state_dict"]` of a PEFT-wrapped model, loaded by the
authors with strict=False. Here every tensor is routed by name, LoRA factors are merged
(W += alpha / r * B @ A, for both the `x.weight` and the newer `x.base_layer.weight` form),
anything absent falls back to the base weights it was trained from (VideoChat-Flash
safetensors, SAM2.1 `["model"]`), every shape is checked against the model the config
describes, and a tensor left without a source is an error that names it.
"""

from __future__ import annotations

import json
import pickle
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from virst.config import VirstConfig, preset
from virst.errors import CheckpointError
from virst.files import save_tensors
from virst.model import CONFIG, TOKENIZER, WEIGHTS, VirstModel, init_empty_weights
from virst.prompt import SEG_TOKEN, load_tokenizer

# official name prefix (after "module." and "base_model.model.") -> ours
ROUTES = [
    ("model.vision_tower.vision_tower.encoder.", "vlm.vision_tower."),
    ("model.mm_projector.", "vlm.mm_projector."),
    ("model.seg_model.", "sam2."),
    ("model.seg_prompter.", "seg_prompter."),
    ("model.initial_seg_fusion_module.", "initial_seg_fusion."),
    ("model.layers.", "vlm.llm.layers."),
    ("model.embed_tokens.", "vlm.llm.embed_tokens."),
    ("model.norm.", "vlm.llm.norm."),
    ("lm_head.", "vlm.lm_head."),
]
UNUSED = ("model.occ_predictor.",)  # in the release, read by nothing
LORA = re.compile(r"^(.*)\.lora_([AB])\.[^.]+\.weight$")


def strip_wrappers(name: str) -> str:
    """Drop DDP's "module." and PEFT's "base_model.model." / ".base_layer." from a key
    (PEFT's prefix sits where PEFT wrapped: at the start in the release, after "vlm.llm."
    in our trainer's state)."""
    if name.startswith("module."):
        name = name[len("module."):]
    return name.replace("base_model.model.", "").replace(".base_layer.", ".")


def route(name: str) -> str | None:
    for official, ours in ROUTES:
        if name.startswith(official):
            return ours + name[len(official):]
    return None


def merge_lora(state: dict[str, torch.Tensor], alpha: float = 16.0) -> tuple[dict, int]:
    """Fold LoRA factors into their base weights; returns (plain state, merged count)."""
    plain, factors = {}, {}
    for name, tensor in state.items():
        m = LORA.match(name)
        if m:
            factors.setdefault(strip_wrappers(m.group(1)), {})[m.group(2)] = tensor
        else:
            plain[strip_wrappers(name)] = tensor
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"LoRA factors of {module} are incomplete: only {set(ab)}")
        key = f"{module}.weight"
        if key not in plain:
            raise CheckpointError(f"LoRA factors for {module} but no base weight {key}")
        a, b = ab["A"].float(), ab["B"].float()
        w = plain[key]
        plain[key] = (w.float() + (alpha / a.shape[0]) * (b @ a)).to(w.dtype)
    return plain, len(factors)


def read_official(path: str | Path, alpha: float = 16.0) -> tuple[dict, list[str], int]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"cannot read the release checkpoint {path}: {err}") from err
    if not isinstance(blob, dict) or "model_state_dict" not in blob:
        raise CheckpointError(f"{path} has no 'model_state_dict' (not the VIRST release?)")
    plain, merged = merge_lora(blob["model_state_dict"], alpha)
    routed, unused = {}, []
    for name, tensor in plain.items():
        ours = route(name)
        if ours is None:
            unused.append(name)
        else:
            routed[ours] = tensor
    return routed, unused, merged


def read_videochat(folder: str | Path) -> dict[str, torch.Tensor]:
    """Base VideoChat-Flash safetensors (same names as the release, no PEFT prefix)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors in the VideoChat-Flash folder {folder}")
    out = {}
    for f in files:
        for name, tensor in load_file(str(f)).items():
            ours = route(name)
            if ours is not None:
                out[ours] = tensor
    return out


def read_sam2(path: str | Path) -> dict[str, torch.Tensor]:
    """Base SAM2.1 checkpoint: torch.load(...)["model"] with SAM2's own names."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"cannot read the SAM2 checkpoint {path}: {err}") from err
    if not isinstance(blob, dict) or "model" not in blob:
        raise CheckpointError(f"{path} has no 'model' entry (not a SAM2 checkpoint?)")
    return {f"sam2.{k}": v for k, v in blob["model"].items()}


def _part(name: str) -> str:
    first = name.split(".")[0]
    return {"vlm": ".".join(name.split(".")[:2])}.get(first, first)


def convert(official: str | Path, out: str | Path, *, videochat: str | Path | None = None,
            sam2: str | Path | None = None, config: VirstConfig | None = None,
            alpha: float = 16.0) -> str:
    """Write a model folder from the release; returns the coverage table as text."""
    config = config or preset("virst-7b")
    with init_empty_weights():
        expected = {k: tuple(v.shape) for k, v in VirstModel(config).state_dict().items()}
    release, unused, merged = read_official(official, alpha)
    sources = [("release", release)]
    if videochat:
        sources.append(("videochat", read_videochat(videochat)))
    if sam2:
        sources.append(("sam2", read_sam2(sam2)))
    state, origin = {}, {}
    for label, tensors in sources:
        for name, tensor in tensors.items():
            if name in expected and name not in state:
                state[name], origin[name] = tensor, label
    bad = [f"{k} {tuple(v.shape)} != {expected[k]}" for k, v in state.items()
           if tuple(v.shape) != expected[k]]
    if bad:
        raise CheckpointError(f"{len(bad)} tensors have the wrong shape: " + "; ".join(bad[:8]))
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"{len(missing)} tensors have no source: "
                              + ", ".join(missing[:8]) + more)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS))
    config.save(out / CONFIG)
    if videochat:
        _write_tokenizer(Path(videochat), out, config)
    table = Counter((_part(k), origin[k]) for k in state)
    lines = [f"{'part':<22}{'release':>9}{'videochat':>11}{'sam2':>7}"]
    for part in sorted({p for p, _ in table}):
        lines.append(f"{part:<22}" + "".join(f"{table[(part, s)]:>{w}}" for s, w in
                                             (("release", 9), ("videochat", 11), ("sam2", 7))))
    lines.append(f"LoRA modules merged: {merged}; unused release tensors: {len(unused)}"
                 + (f" ({', '.join(sorted(unused)[:4])}...)" if unused else ""))
    (out / "conversion.json").write_text(json.dumps(
        {"origin": Counter(origin.values()), "lora_merged": merged, "unused": unused},
        indent=2) + "\n")
    return "\n".join(lines)


def _write_tokenizer(videochat: Path, out: Path, config: VirstConfig) -> None:
    tok = load_tokenizer(videochat)
    if tok.token_to_id(SEG_TOKEN) is None:
        tok.add_tokens([SEG_TOKEN])  # as the release does: tokenizer.add_tokens(["[SEG]"])
    if tok.token_to_id(SEG_TOKEN) != config.seg_token_id:
        raise CheckpointError(f"{SEG_TOKEN} would get id {tok.token_to_id(SEG_TOKEN)}, "
                              f"the checkpoint's embedding expects {config.seg_token_id}")
    tok.save(str(out / TOKENIZER))
