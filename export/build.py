"""python -m export.build --precision bf16: a VIRST checkpoint -> verified deployment units.

    ARTIFACTS/manifest.json                 every file, hash, shapes, plan, checks
    ARTIFACTS/<unit>.<precision>.onnx       one per unit (export/units.py)
    ARTIFACTS/constants.safetensors         dense PE, no_mem_embed, temporal encodings, ...
    ARTIFACTS/llm/  embed_tokens.safetensors   Qwen2 for vLLM + text embedding table
    ARTIFACTS/tensorrt/                     engines + timing cache (where TensorRT runs)

A unit whose weights, code (virst/ and export/), precision and opset are unchanged is not
rebuilt.
A failed export or verification stops the build with a report naming the unit.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch
from tqdm.auto import tqdm

from export import manifest as mf
from export.onnx_io import Verification, export_onnx, load_checked, structural_check, verify
from export.precision import apply_precision
from export.units import UNIT_NAMES, Unit, build_units
from virst.errors import VirstError
from virst.files import save_tensors
from virst.tdau import no_prompt_tokens

PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_OPSET = 23
# per-unit fp32 scopes (prefixes): ToMe's matching decides token order, keep it exact; STF
# whole ("": every scope): its click is the argmax of its last attention over the grid
# cells, and bf16 inside STF moved it to another cell (prompt cosine 0.971, cp3b)
OVERRIDES = {"vision": {"fp32_scopes": ("vlm.mm_projector",),
                        "low_scopes": ("vlm.mm_projector.mlp",)},
             "seg_prompter": {"fp32_scopes": ("",)}}


class BuildError(VirstError):
    pass


def _source_key(unit: Unit, precision: str, opset: int) -> str:
    h = hashlib.sha256(f"{unit.name}|{precision}|{opset}|{torch.__version__}|"
                       f"{onnx.__version__}|sam2 {mf.producers().get('sam2')}|"
                       f"{mf.code_fingerprint()}".encode())
    for name, t in sorted(unit.module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _io(model: onnx.ModelProto, which: str) -> list[dict]:
    out = []
    for vi in getattr(model.graph, which):
        dims = [d.dim_param if d.dim_param else d.dim_value
                for d in vi.type.tensor_type.shape.dim]
        out.append({"name": vi.name, "shape": dims,
                    "dtype": onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)})
    return out


def _named_dims(model: onnx.ModelProto, unit: Unit) -> None:
    """Give dynamic axes the unit's names (the exporter invents its own)."""
    for vi in list(model.graph.input):
        for axis, name in unit.dynamic.get(vi.name, {}).items():
            vi.type.tensor_type.shape.dim[axis].dim_param = name


def build_unit(unit: Unit, out: Path, precision: str, opset: int, check: bool):
    """Export, convert, check and verify one unit; returns (manifest entry, verifications)."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / f"{unit.name}.onnx"
        exporter = export_onnx(unit, fp32_path, opset)
        model = onnx.load(str(fp32_path))
    _named_dims(model, unit)
    over = OVERRIDES.get(unit.name, {})
    model, plan = apply_precision(model, precision, unit.fp32_inputs, unit.fp32_outputs,
                                  over.get("fp32_scopes", ()), over.get("low_scopes", ()))
    path = out / f"{unit.name}.{precision}.onnx"
    onnx.save(model, str(path))
    model = load_checked(path)
    fp32_io = set(unit.fp32_inputs) | set(unit.fp32_outputs)
    problems = structural_check(model, precision, fp32_io)
    if problems:
        raise BuildError(f"{unit.name} ({precision}): " + "; ".join(problems))
    checks = verify(unit, path, precision) if check else []
    failed = [c for c in checks if not c.passed]
    if failed:
        raise BuildError(f"{unit.name} ({precision}) failed verification: " + "; ".join(
            f"{c.metric} = {c.value:.3g}" for c in failed))
    entry = {
        "files": {path.name: mf.sha256_file(path)}, "exporter": exporter, "opset": opset,
        "inputs": _io(model, "input"), "outputs": _io(model, "output"),
        "precision_plan": {"precision": plan.precision, "fp32_nodes": plan.fp32_nodes,
                           "low_nodes": plan.low_nodes, "casts_added": plan.casts_added,
                           "fp32_scopes": list(plan.fp32_scopes),
                           "fp32_io": sorted(fp32_io)},
        "verification": [c.__dict__ for c in checks],
    }
    return entry, checks


def write_constants(model, out: Path) -> dict:
    sam, cfg = model.sam2, model.config
    with torch.no_grad():
        f = cfg.sam_feat_size
        level2_pos = sam.image_encoder.neck.position_encoding(torch.zeros(1, cfg.sam_dim, f, f))
        mem_pos = sam.memory_encoder.position_encoding(torch.zeros(1, cfg.mem_dim, f, f))
        tensors = {
            "image_pe": sam.sam_prompt_encoder.get_dense_pe(),
            "level2_pos": level2_pos, "maskmem_pos": mem_pos,
            "maskmem_tpos_enc": sam.maskmem_tpos_enc, "no_mem_embed": sam.no_mem_embed,
            "no_mem_pos_enc": sam.no_mem_pos_enc, "no_obj_ptr": sam.no_obj_ptr,
            "no_obj_embed_spatial": sam.no_obj_embed_spatial,
            "no_prompt_tokens": no_prompt_tokens(sam),
            "obj_ptr_tpos_proj.weight": sam.obj_ptr_tpos_proj.weight,
            "obj_ptr_tpos_proj.bias": sam.obj_ptr_tpos_proj.bias,
        }
    path = out / "constants.safetensors"
    save_tensors({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(path))
    return {"files": {path.name: mf.sha256_file(path)},
            "tensors": {k: list(v.shape) for k, v in tensors.items()}}


def _tensorrt(manifest: dict, out: Path, precision: str, cfg) -> str:
    from export.tensorrt import build_engine, plan_profile, tensorrt_status

    trt, gpu = tensorrt_status()
    if trt is None:
        return gpu  # the reason
    engines = {}
    for name, entry in manifest["artifacts"].items():
        onnx_files = [f for f in entry.get("files", {}) if f.endswith(".onnx")]
        if not onnx_files:
            continue
        profile = plan_profile(entry["inputs"], cfg)
        path, _ = build_engine(trt, out / onnx_files[0], out / "tensorrt", profile, precision,
                               gpu, entry["files"][onnx_files[0]],
                               out / "tensorrt" / "timing.cache")
        engines[name] = {"files": {f"tensorrt/{path.name}": mf.sha256_file(path)},
                         "profile": profile.to_json()}
    manifest["artifacts"].update({f"trt:{k}": v for k, v in engines.items()})
    return f"{len(engines)} TensorRT engines on {gpu}"


def model_identity(checkpoint: str | None) -> dict:
    """Which model the artifacts come from (the runtime refuses them for another)."""
    from virst.cli import DEFAULT_MODEL_DIR

    folder = Path(checkpoint) if checkpoint else DEFAULT_MODEL_DIR
    return {"folder": str(folder.resolve()),
            "fingerprint": mf.weights_fingerprint(folder / "model.safetensors")}


def load_model(checkpoint: str | None):
    from virst.cli import load_model as cli_load

    return cli_load(checkpoint).eval()


def build(precision: str, out: Path, checkpoint: str | None = None, units=None,
          opset: int = DEFAULT_OPSET, check: bool = True, tensorrt: bool = True,
          progress: bool = True) -> tuple[dict, list[Verification]]:
    if precision not in PRECISIONS:
        raise BuildError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    model = load_model(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    old = mf.read(out)
    if old and (old.get("precision") != precision or old.get("format") != mf.FORMAT):
        raise BuildError(f"{out} holds {old.get('precision')} artifacts; use another --out")
    manifest = {"format": mf.FORMAT, "toolkit": mf.toolkit_version(), "precision": precision,
                "producers": mf.producers(), "config": model.config.to_dict(),
                "model": model_identity(checkpoint),
                "artifacts": dict(old.get("artifacts", {}))}
    checks_all: list[Verification] = []
    want_llm = units is None or "llm" in units
    todo = build_units(model, None if units is None else [u for u in units if u != "llm"])
    for unit in tqdm(todo, desc=f"export {precision}", disable=not progress):
        key = _source_key(unit, precision, opset)
        prev = manifest["artifacts"].get(unit.name, {})
        files_ok = all((out / f).is_file() and mf.sha256_file(out / f) == h
                       for f, h in prev.get("files", {}).items())
        if prev.get("source_key") == key and prev.get("files") and files_ok:
            checks_all += [Verification(**c) for c in prev.get("verification", [])]
            continue
        entry, checks = build_unit(unit, out, precision, opset, check)
        entry["source_key"] = key
        manifest["artifacts"][unit.name] = entry
        checks_all += checks
        mf.write(out, manifest)  # progress survives an interruption
    manifest["artifacts"]["constants"] = write_constants(model, out)
    if want_llm:
        from export.llm import write_llm_folder

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        shutil.rmtree(out / "llm", ignore_errors=True)
        files = write_llm_folder(model, out / "llm", dtype)
        manifest["artifacts"]["llm"] = {"files": {str(f.relative_to(out)): mf.sha256_file(f)
                                                  for f in files}}
    manifest["tensorrt"] = _tensorrt(manifest, out, precision, model.config) if tensorrt \
        else "disabled (--no-tensorrt)"
    mf.write(out, manifest)
    return manifest, checks_all


def table(checks: list[Verification]) -> str:
    lines = [f"{'unit':<24}{'precision':<10}{'backend':<19}{'check':<30}{'value':>10}  pass"
             "  note"]
    for c in checks:  # similarities near 1 need digits, errors an exponent
        value = f"{c.value:.6f}" if "max_rel" not in c.metric else f"{c.value:.2e}"
        lines.append(f"{c.unit:<24}{c.precision:<10}{c.backend:<19}{c.metric:<30}"
                     f"{value:>10}  {'yes' if c.passed else 'NO ':<4}  {c.note}".rstrip())
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.build", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--precision", default="bf16", help=f"one of {', '.join(PRECISIONS)}")
    ap.add_argument("--out", help="artifact folder (default: artifacts/<precision>)")
    ap.add_argument("--checkpoint", help="model folder (default: the embedded model)")
    ap.add_argument("--units", help=f"comma-separated subset of {', '.join(UNIT_NAMES)}, llm")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    ap.add_argument("--skip-verify", action="store_true")
    ap.add_argument("--no-tensorrt", action="store_true")
    args = ap.parse_args(argv)
    units = args.units.split(",") if args.units else None
    out = Path(args.out or f"artifacts/{args.precision}")
    start = time.perf_counter()
    try:
        manifest, checks = build(args.precision, out, args.checkpoint, units, args.opset,
                                 not args.skip_verify, not args.no_tensorrt)
    except (VirstError, ValueError, RuntimeError) as err:
        print(f"export.build: error: {err}", file=sys.stderr)
        return 2
    print(table(checks))
    print(f"TensorRT: {manifest['tensorrt']}")
    print(f"{len(manifest['artifacts'])} artifacts in {out} "
          f"({time.perf_counter() - start:.0f} s); manifest {out / mf.MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
