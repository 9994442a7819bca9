"""Precision written into the graph (TensorRT 11 has no FP16/BF16 builder flags: networks
are strongly typed). From an fp32 ONNX graph, `apply_precision` makes an fp16 or bf16 graph
with fp32 islands, inserting Casts at the boundaries:

- heavy ops (MatMul, Gemm, Conv, ConvTranspose, Attention) always run in low precision;
- normalisations and reductions (LayerNormalization, Softmax, Reduce*) run in fp32 and
  hand low precision on;
- fp32 sources (Sigmoid, Exp, Cos/Sin of RoPE tables, Sqrt, mask Resize, explicit Casts to
  float in the model code) run in fp32 and their results stay fp32 through elementwise and
  data-movement ops until a heavy op or an output takes them;
- elementwise and data-movement ops run in fp32 when any float input is fp32;
- graph inputs and outputs are low precision unless the unit lists them as fp32 (mask
  logits, scores, the memory encoder's mask input);
- a per-unit table can force whole module scopes to fp32 (e.g. ToMe's matching).
Constants are stored in the precision their consumers use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LOW = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
HEAVY = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention"}
REDUCE_ISLANDS = {"LayerNormalization", "Softmax", "ReduceMean", "ReduceL2", "ReduceMax",
                  "ReduceSum", "ReduceMin", "RMSNormalization"}
SOURCE_ISLANDS = {"Sigmoid", "Exp", "Log", "Cos", "Sin", "Sqrt", "Pow", "Reciprocal", "Erf",
                  "Resize"}
NON_DATA_INPUTS = {("Resize", 1), ("Resize", 2)}  # roi, scales: parameters, fp32 always
FLOAT = TensorProto.FLOAT


@dataclass(frozen=True)
class PrecisionPlan:
    """What `apply_precision` did, for the manifest."""

    precision: str
    fp32_nodes: int
    low_nodes: int
    casts_added: int
    fp32_scopes: tuple[str, ...]


def _scope(node) -> str:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            return ".".join(s.strip("'\" ") for s in p.value.strip("[]").split(",") if s.strip(
                "'\" "))
    return ""


def _bf16(array: np.ndarray) -> TensorProto:
    """bf16 initializer from fp32 (round to nearest even), stored as raw uint16."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    t = TensorProto()
    t.data_type = TensorProto.BFLOAT16
    t.dims.extend(array.shape)
    t.raw_data = bits.tobytes()
    return t


def _convert(array: np.ndarray, dtype: int, name: str) -> TensorProto:
    if dtype == TensorProto.BFLOAT16:
        t = _bf16(array)
    else:
        t = numpy_helper.from_array(array.astype(np.float16 if dtype == TensorProto.FLOAT16
                                                 else np.float32))
    t.name = name
    return t


def apply_precision(model: onnx.ModelProto, precision: str, fp32_inputs=(), fp32_outputs=(),
                    fp32_scopes=(), low_scopes=()) -> tuple[onnx.ModelProto, PrecisionPlan]:
    if precision == "fp32":
        return model, PrecisionPlan("fp32", len(model.graph.node), 0, 0, ())
    if precision not in LOW:
        raise ValueError(f"unknown precision {precision!r}; choose fp32, fp16 or bf16")
    low = LOW[precision]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = model.graph
    elem = {vi.name: vi.type.tensor_type.elem_type
            for vi in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {t.name: t for t in g.initializer}
    for name, t in inits.items():
        elem[name] = t.data_type
    state: dict[str, int] = {}  # float tensor -> its dtype in the new graph
    for inp in g.input:
        if elem.get(inp.name) == FLOAT:
            state[inp.name] = FLOAT if inp.name in fp32_inputs else low
            inp.type.tensor_type.elem_type = state[inp.name]
    new_nodes, new_inits, casts = [], {}, 0
    copies: dict[tuple[str, int], str] = {}
    counts = {FLOAT: 0, low: 0}

    def want(name: str, dtype: int) -> str:
        """`name` as a tensor of `dtype`: converted constant, existing, or a new Cast."""
        nonlocal casts
        if (name, dtype) in copies:
            return copies[(name, dtype)]
        if name in inits:
            arr = numpy_helper.to_array(inits[name])
            alias = name if dtype == FLOAT else f"{name}__{precision}"
            new_inits[alias] = _convert(arr, dtype, alias)
            copies[(name, dtype)] = alias
            return alias
        if state.get(name, dtype) == dtype:
            return name
        alias = f"{name}__to{'fp32' if dtype == FLOAT else precision}"
        new_nodes.append(helper.make_node("Cast", [name], [alias], to=dtype,
                                          name=f"cast_{alias}"))
        casts += 1
        copies[(name, dtype)] = alias
        return alias

    def is_float(name: str) -> bool:
        return bool(name) and (elem.get(name) == FLOAT or name in state)

    for node in g.node:
        if node.op_type == "Constant" and node.attribute[0].t.data_type == FLOAT:
            inits[node.output[0]] = node.attribute[0].t  # handled like an initializer
            inits[node.output[0]].name = node.output[0]
            continue
        scope = _scope(node)
        data = [(i, x) for i, x in enumerate(node.input)
                if is_float(x) and (node.op_type, i) not in NON_DATA_INPUTS]
        forced = (any(scope.startswith(s) for s in fp32_scopes)
                  and not any(scope.startswith(s) for s in low_scopes))
        if forced:
            prec = FLOAT
        elif node.op_type in HEAVY:
            prec = low
        elif node.op_type in REDUCE_ISLANDS | SOURCE_ISLANDS:
            prec = FLOAT
        elif node.op_type == "Cast":
            prec = FLOAT if _attr(node, "to") == FLOAT else low
        else:
            prec = FLOAT if any(state.get(x) == FLOAT or (x in inits and _fp32_table(x))
                                for _, x in data) else low
        for i, x in data:
            node.input[i] = want(x, prec)
        if node.op_type == "Cast" and _attr(node, "to") == FLOAT:
            _set_attr(node, "to", prec)
        if node.op_type == "ConstantOfShape":
            value = node.attribute[0].t
            if value.data_type == FLOAT:
                node.attribute[0].t.CopyFrom(_convert(numpy_helper.to_array(value), prec, ""))
        counts[prec] += 1
        hand_on = low if node.op_type in REDUCE_ISLANDS and not forced else prec
        new_nodes.append(node)
        for out in node.output:
            if elem.get(out) == FLOAT:
                state[out] = prec
                if hand_on != prec:
                    renamed = f"{out}__fp32"
                    idx = list(node.output).index(out)
                    node.output[idx] = renamed
                    state[renamed] = prec
                    new_nodes.append(helper.make_node("Cast", [renamed], [out], to=hand_on,
                                                      name=f"cast_{out}"))
                    casts += 1
                    state[out] = hand_on
    for out in g.output:
        if elem.get(out.name) == FLOAT or out.name in state:
            target = FLOAT if out.name in fp32_outputs else low
            if state.get(out.name) != target:
                src = f"{out.name}__pre"
                for n in new_nodes:
                    n.output[:] = [src if o == out.name else o for o in n.output]
                    n.input[:] = [src if i == out.name else i for i in n.input]
                new_nodes.append(helper.make_node("Cast", [src], [out.name], to=target,
                                                  name=f"cast_{out.name}"))
                casts += 1
            out.type.tensor_type.elem_type = target
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used and t.name not in new_inits]
    del g.initializer[:]
    g.initializer.extend(kept + [t for t in new_inits.values() if t.name in used])
    del g.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    plan = PrecisionPlan(precision, counts[FLOAT], counts[low], casts, tuple(fp32_scopes))
    return model, plan


def _fp32_table(name: str) -> bool:
    """RoPE tables stay fp32 (named cos/sin by the export wrappers)."""
    base = name.split("__")[0].rsplit(".", 1)[-1]
    return base in ("cos", "sin")


def _attr(node, name):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def _set_attr(node, name, value):
    for a in node.attribute:
        if a.name == name:
            a.i = value


def float_types(model: onnx.ModelProto) -> dict[str, int]:
    """elem type of every tensor (after shape inference), for structural checks."""
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def emulate_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The bf16 graph as an fp32 graph whose every bf16 value is rounded to bf16 (a Cast
    round trip): bf16 storage precision with fp32 arithmetic inside each op, as tensor cores
    accumulate. ONNX Runtime's CPU provider has Cast to and from bf16 but no bf16 compute
    kernels, so this is how bf16 graphs get numbers on a CPU."""
    bf16 = TensorProto.BFLOAT16
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    types = float_types(model)
    for t in g.initializer:
        if t.data_type == bf16:
            t.CopyFrom(_convert(numpy_helper.to_array(t).astype(np.float32), FLOAT, t.name))
    nodes = []
    for vi in g.input:  # a bf16 input is rounded where the caller converts it
        if vi.type.tensor_type.elem_type == bf16:
            rounded = f"{vi.name}__rounded"
            for node in g.node:
                node.input[:] = [rounded if x == vi.name else x for x in node.input]
            nodes += [helper.make_node("Cast", [vi.name], [f"{vi.name}__bf16"], to=bf16),
                      helper.make_node("Cast", [f"{vi.name}__bf16"], [rounded], to=FLOAT)]
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == bf16:
            vi.type.tensor_type.elem_type = FLOAT
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == bf16:
                a.t.CopyFrom(_convert(numpy_helper.to_array(a.t).astype(np.float32), FLOAT,
                                      a.t.name))
        nodes.append(node)
        for i, out in enumerate(node.output):
            if types.get(out) != bf16:
                continue
            raw = f"{out}__unrounded"
            node.output[i] = raw
            if node.op_type == "Cast":
                _set_attr(node, "to", bf16)  # the rounding itself, then back to float
                nodes.append(helper.make_node("Cast", [raw], [out], to=FLOAT))
            else:
                nodes += [helper.make_node("Cast", [raw], [f"{out}__bf16"], to=bf16),
                          helper.make_node("Cast", [f"{out}__bf16"], [out], to=FLOAT)]
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)
