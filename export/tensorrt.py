"""TensorRT engines from the ONNX units: optimisation profiles from each unit's dynamic
axes, a persistent timing cache, and an engine cache keyed by (ONNX bytes, TensorRT
version, GPU, precision, profiles). Networks are built strongly typed: precision comes from
the graph (TensorRT 11 has no FP16/BF16 builder flags; TensorRT 10 honours the same flag).

The planning half (profiles, keys) is plain Python. The adapter half calls the TensorRT
API through the `trt` module passed in, so that it can be tested against a fake module on
machines where TensorRT cannot be installed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from virst.config import VirstConfig

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """min / opt / max shape of every input of one engine."""

    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_json(self) -> dict:
        return {k: [list(s) for s in v] for k, v in sorted(self.shapes.items())}


def dynamic_ranges(cfg: VirstConfig) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every named dynamic axis, from the model's limits."""
    hw = cfg.sam_feat_size**2
    split = cfg.sam_dim // cfg.mem_dim
    frames = cfg.max_memory_frames
    return {
        "batch": (1, 4, 16),
        "objects": (1, 1, 8),  # expressions propagated together in one session
        "memory_tokens": (hw, frames * hw, frames * hw),
        "pointer_tokens": (split, cfg.max_obj_ptrs * split, cfg.max_pointer_frames * split),
        "seg_frames": (1, cfg.max_seg_frames, cfg.stf_max_frames),
        "clips": (1, cfg.max_vlm_frames // cfg.clip_frames, cfg.max_vlm_frames // cfg.clip_frames),
    }


def plan_profile(inputs: list[dict], cfg: VirstConfig) -> Profile:
    """A profile for a unit whose manifest `inputs` list shapes with named dynamic axes."""
    ranges = dynamic_ranges(cfg)
    shapes = {}
    for inp in inputs:
        lo, opt, hi = [], [], []
        for dim in inp["shape"]:
            if isinstance(dim, int):
                lo.append(dim), opt.append(dim), hi.append(dim)
                continue
            if dim not in ranges:
                raise ValueError(f"input {inp['name']}: no range for dynamic axis {dim!r}")
            a, b, c = ranges[dim]
            lo.append(a), opt.append(b), hi.append(c)
        shapes[inp["name"]] = (tuple(lo), tuple(opt), tuple(hi))
    return Profile(shapes)


def engine_key(onnx_sha256: str, trt_version: str, gpu: str, precision: str,
               profile: Profile) -> str:
    blob = json.dumps([onnx_sha256, trt_version, gpu, precision, profile.to_json()])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------- adapter


def _network_flags(trt) -> int:
    flags = 0
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if typed is None:
        raise RuntimeError(f"TensorRT {trt.__version__} cannot build strongly typed networks "
                           "(needs 10 or newer)")
    flags |= 1 << int(typed)
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if explicit is not None and int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(explicit)  # only before 10; deprecated then removed
    return flags


def build_engine(trt, onnx_path: Path, engine_dir: Path, profile: Profile, precision: str,
                 gpu: str, onnx_sha256: str, timing_cache: Path,
                 workspace_bytes: int = 4 << 30) -> tuple[Path, bool]:
    """Build (or find in the cache) the engine of one ONNX file. Returns (path, built)."""
    key = engine_key(onnx_sha256, trt.__version__, gpu, precision, profile)
    engine_path = engine_dir / f"{onnx_path.stem}.{key}.engine"
    if engine_path.is_file():
        return engine_path, False
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file()
                                       else b"")
    config.set_timing_cache(cache, False)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.shapes.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path.name}")
    engine_dir.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_suffix(".partial")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(engine_path)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path, True


def tensorrt_status():
    """(trt module, GPU name) when engines can be built here, else (None, reason)."""
    try:
        import tensorrt as trt
    except Exception as err:  # placeholder wheels fail in many ways
        return None, f"TensorRT is not usable here ({type(err).__name__}: {err}); skipped"
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA GPU: TensorRT engines skipped"
    return trt, torch.cuda.get_device_name()
