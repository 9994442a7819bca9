"""Export one unit to ONNX, check the file, verify it against torch with ONNX Runtime."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from export.precision import LOW, emulate_bf16, float_types
from export.units import Unit
from virst.errors import CheckpointError

# Ops the exporters produce for our units; anything else is a surprise worth a failure.
ALLOWED_OPS = {
    "Add", "And", "ArgMax", "Attention", "Cast", "Concat", "Constant", "ConstantOfShape",
    "Conv", "ConvTranspose", "Cos", "Div", "Equal", "Erf", "Exp", "Expand", "Gather",
    "GatherElements", "GatherND", "Gelu", "Gemm", "Greater", "GreaterOrEqual", "Identity",
    "IsNaN", "LayerNormalization", "Less", "MatMul", "Max", "MaxPool", "Min", "Mod", "Mul",
    "Neg", "Not", "Or", "Pad", "Pow", "Range", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceSum",
    "Relu", "Reshape", "Resize", "ScatterElements", "ScatterND", "Shape", "Sigmoid", "Sin",
    "Size", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "TopK",
    "Transpose", "Trilu", "Unsqueeze", "Where",
}
COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
# low-precision pass marks against torch fp32 (fp32 itself: max relative error <= 1e-4)
LIMITS = {"fp16": {"cosine": 0.999, "iou": 0.98}, "bf16": {"cosine": 0.995, "iou": 0.95}}


@dataclass
class Verification:
    unit: str
    precision: str
    backend: str
    metric: str
    value: float
    passed: bool
    note: str = ""


def export_onnx(unit: Unit, path: Path, opset: int) -> str:
    """fp32 ONNX of `unit` at `path`; the dynamo exporter, else TorchScript. Returns which."""
    module = unit.module.eval()
    names, args = list(unit.inputs), tuple(unit.inputs.values())
    dynamic = {k: unit.dynamic.get(k) for k in names} if unit.dynamic else None
    quiet = contextlib.redirect_stdout(io.StringIO())
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with quiet, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, input_names=names,
                                        output_names=unit.outputs, dynamic_shapes=dynamic,
                                        dynamo=True, opset_version=opset, verbose=False)
            program.save(str(path))
        return "dynamo"
    except Exception as first:  # the exporter raises many types; fall back, then report
        axes = {k: {i: n for i, n in v.items()} for k, v in unit.dynamic.items()}
        try:
            with quiet, warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(path), input_names=names,
                                  output_names=unit.outputs, dynamic_axes=axes, dynamo=False,
                                  opset_version=min(opset, 20))
            return "torchscript"
        except Exception as second:
            raise RuntimeError(f"{unit.name}: both exporters failed: dynamo: "
                               f"{str(first)[:300]}; torchscript: {str(second)[:300]}") from second


def load_checked(path: Path) -> onnx.ModelProto:
    """Load and fully check an ONNX file; a clear error for a corrupt or truncated one."""
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"ONNX file {path} is missing") from err
    except Exception as err:  # onnx raises DecodeError, ValidationError, ...
        raise CheckpointError(f"ONNX file {path} is corrupt or truncated: "
                              f"{type(err).__name__}: {str(err)[:200]}") from err
    return model


def structural_check(model: onnx.ModelProto, precision: str, fp32_io=()) -> list[str]:
    """Problems with a graph: ops outside the allow-list, complex tensors, and (for fp16 /
    bf16) float inputs or outputs of the wrong dtype. Empty when the graph is sound."""
    problems = []
    ops = {n.op_type for n in model.graph.node}
    if ops - ALLOWED_OPS:
        problems.append(f"ops outside the allow-list: {sorted(ops - ALLOWED_OPS)}")
    types = float_types(model)
    if any(t in COMPLEX for t in types.values()):
        problems.append("complex-valued tensors")
    if precision in LOW:
        for vi in list(model.graph.input) + list(model.graph.output):
            t = vi.type.tensor_type.elem_type
            if t in (onnx.TensorProto.FLOAT, LOW[precision]):
                want = onnx.TensorProto.FLOAT if vi.name in fp32_io else LOW[precision]
                if t != want:
                    problems.append(f"{vi.name} is {onnx.TensorProto.DataType.Name(t)}")
        low = sum(1 for t in types.values() if t == LOW[precision])
        if low == 0:
            problems.append(f"no {precision} tensors at all")
    return problems


def _metrics(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    ours, ref = ours.astype(np.float64), ref.astype(np.float64)
    rel = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12)
    denom = np.linalg.norm(ours) * np.linalg.norm(ref)
    cos = float((ours * ref).sum() / denom) if denom > 0 else float(np.allclose(ours, ref))
    return {"max_rel": float(rel), "cosine": cos}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    pa, pb = a > 0, b > 0
    union = (pa | pb).sum()
    return float((pa & pb).sum() / union) if union else 1.0


def verify(unit: Unit, path: Path, precision: str) -> list[Verification]:
    """Run the file with ONNX Runtime on fresh random inputs against torch in fp32.

    fp32: max relative error <= 1e-4 on every output. fp16 / bf16: cosine on features and
    mask IoU on mask logits, passing at `LIMITS` or, where torch itself loses more in the
    same dtype (autocast; e.g. ToMe merges that flip), within twice torch's own loss.
    bf16 on CPU: ONNX Runtime has no bf16 kernels, so the graph runs with every bf16 value
    rounded by a Cast round trip (`emulate_bf16`: bf16 storage, fp32 arithmetic inside an
    op, as tensor cores accumulate). Real bf16 kernels need a GPU backend."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(1234)
    fresh = {k: _fresh(v, gen) for k, v in unit.inputs.items()}
    ref = _run_torch(unit, fresh)
    backend, graph = "onnxruntime-cpu", str(path)
    if precision == "bf16":
        backend = "ort-cpu bf16-emul"
        graph = emulate_bf16(onnx.load(str(path))).SerializeToString()
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in session.get_inputs():
        arr = fresh[inp.name].numpy()
        feeds[inp.name] = arr.astype(np.float16) if inp.type == "tensor(float16)" else arr
    outs = session.run(unit.outputs, feeds)
    if precision == "fp32":
        return [Verification(unit.name, precision, backend, f"{name} max_rel", err,
                             err <= 1e-4)
                for name, o, r in zip(unit.outputs, outs, ref)
                for err in [_metrics(o, r)["max_rel"]]]
    same = _run_torch(unit, fresh, {"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
    results = []
    for name, o, r, t in zip(unit.outputs, outs, ref, same):
        kind = "iou" if name == "mask_logits" else "cosine"
        ours, torchs = _similarity(kind, o, r), _similarity(kind, t, r)
        passed = ours >= LIMITS[precision][kind] or 1 - ours <= 2 * (1 - torchs) + 1e-6
        label = "mask IoU" if kind == "iou" else "cosine"
        results.append(Verification(unit.name, precision, backend, f"{name} {label}", ours,
                                    passed, f"torch {precision}: {torchs:.6f}"))
    return results


def _run_torch(unit: Unit, inputs: dict, dtype: torch.dtype | None = None) -> list[np.ndarray]:
    """The unit's torch outputs, fp32 or under CPU autocast in `dtype`."""
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                         enabled=dtype is not None):
        out = unit.module.eval()(**inputs)
    return [o.float().numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _similarity(kind: str, a: np.ndarray, b: np.ndarray) -> float:
    return mask_iou(a, b) if kind == "iou" else _metrics(a, b)["cosine"]


def _fresh(example: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """New random values like `example` (validity masks keep their pattern)."""
    if example.dtype != torch.float32 or set(example.unique().tolist()) <= {0.0, 1.0}:
        return example.clone()
    scale = example.std().item() or 1.0
    return torch.randn(example.shape, generator=gen) * scale
