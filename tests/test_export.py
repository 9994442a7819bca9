"""`python -m export.build`: every unit against torch through ONNX Runtime, dynamic memory,
precision plans, the manifest's refusals, the LLM folder, TensorRT planning, and the
reference pipeline stitched through the ONNX artifacts."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export.build as build_mod
from export.build import build
from export.manifest import load_manifest
from export.onnx_io import load_checked
from export.units import MemoryAttention
from virst.errors import CheckpointError
from virst.model import VirstModel

pytestmark = pytest.mark.slow


def test_every_fp32_unit_equals_torch(fp32):
    out, manifest, checks = fp32
    units = {c.unit for c in checks}
    assert units == set(build_mod.UNIT_NAMES)
    assert all(c.passed and c.value <= 1e-4 for c in checks), [c for c in checks if not c.passed]
    for name in build_mod.UNIT_NAMES:
        entry = manifest["artifacts"][name]
        assert entry["exporter"] in ("dynamo", "torchscript")
        model = onnx.load(str(out / next(iter(entry["files"]))))
        assert model.opset_import[0].version >= 18
    assert manifest["artifacts"]["memory_attention"]["exporter"] == "dynamo"
    dims = manifest["artifacts"]["memory_attention"]["inputs"][1]["shape"]
    assert dims[1] == "memory_tokens"
    # at a recent opset the exporter writes attention as one node
    ops = {n.op_type for n in onnx.load(str(out / "memory_attention.fp32.onnx")).graph.node}
    assert "Attention" in ops and "Softmax" not in ops


@torch.no_grad()
def test_memory_attention_takes_1_to_9_frames_and_any_pointer_count(fp32, tiny_dir):
    out, _, _ = fp32
    model = VirstModel.from_pretrained(tiny_dir)
    unit = MemoryAttention(model).eval()
    padded_unit = MemoryAttention(model, padded=True).eval()
    sess = ort.InferenceSession(str(out / "memory_attention.fp32.onnx"))
    padded = ort.InferenceSession(str(out / "memory_attention_padded.fp32.onnx"))
    cfg = model.config
    hw, cm, split = cfg.sam_feat_size**2, cfg.mem_dim, cfg.sam_dim // cfg.mem_dim
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(1, cfg.sam_dim, cfg.sam_feat_size, cfg.sam_feat_size, generator=g)
    most = (cfg.max_memory_frames, cfg.max_pointer_frames)  # 9 frames, 18 pointers
    for frames, ptrs in [(1, 1), (2, 0), (4, 7), most]:
        mem, mem_pos = (torch.randn(1, frames * hw, cm, generator=g) for _ in range(2))
        ptr, ptr_pos = (torch.randn(1, ptrs * split, cm, generator=g) for _ in range(2))
        ref = unit(feats, mem, mem_pos, ptr, ptr_pos).numpy()
        feeds = dict(features=feats, memory=mem, memory_pos=mem_pos, pointers=ptr,
                     pointer_pos=ptr_pos)
        got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), (frames, ptrs)
        # the padded static variant with validity masks gives the same answer
        pad_frames, pad_ptrs = cfg.max_memory_frames, cfg.max_pointer_frames * split
        pf = torch.zeros(1, pad_frames * hw, cm)
        pf[:, : frames * hw] = mem
        pp = torch.zeros(1, pad_frames * hw, cm)
        pp[:, : frames * hw] = mem_pos
        qf, qp = torch.zeros(1, pad_ptrs, cm), torch.zeros(1, pad_ptrs, cm)
        qf[:, : ptrs * split], qp[:, : ptrs * split] = ptr, ptr_pos
        fv = (torch.arange(pad_frames) < frames).float()[None]
        pv = (torch.arange(pad_ptrs) < ptrs * split).float()[None]
        ptorch = padded_unit(feats, pf, pp, qf, qp, fv, pv).numpy()
        assert np.abs(ptorch - ref).max() <= 1e-4 * np.abs(ref).max()
        pad_feeds = dict(features=feats, memory=pf, memory_pos=pp, pointers=qf,
                         pointer_pos=qp, memory_valid=fv, pointer_valid=pv)
        gotp = padded.run(None, {k: v.numpy() for k, v in pad_feeds.items()})[0]
        assert np.abs(gotp - ref).max() <= 1e-4 * np.abs(ref).max()


def test_tampered_truncated_and_foreign_artifacts_are_refused(fp32, tmp_path):
    out, _, _ = fp32
    copy = tmp_path / "a"
    shutil.copytree(out, copy)
    load_manifest(copy)  # intact: accepted
    path = copy / "memory_encoder.fp32.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its manifest hash"):
        load_manifest(copy)
    path.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checked(path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["toolkit"] = "0.0.1"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="built by virst-deploy 0.0.1"):
        load_manifest(copy)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_manifest(tmp_path)


def test_unchanged_units_are_not_rebuilt(fp32, tiny_dir, monkeypatch):
    out, _, _ = fp32
    calls = []
    monkeypatch.setattr(build_mod, "build_unit", lambda *a, **k: calls.append(a[0].name))
    manifest, checks = build("fp32", out, str(tiny_dir), tensorrt=False, progress=False)
    assert calls == [] and len(checks) > 0


def test_a_change_to_the_model_code_rebuilds_the_units(fp32, tiny_dir, monkeypatch,
                                                       tmp_path):
    """The build key and the runtime cache's folder cover the model's code, not only the
    export code: after an edit of virst/stf.py the units are rebuilt and the runtime's
    cache looks in a new folder (it had kept serving graphs of the older code)."""
    from runtime.artifacts import cache_key

    out = tmp_path / "artifacts"
    shutil.copytree(fp32[0], out)
    entries = load_manifest(out)["artifacts"]
    calls = []

    def rebuilt(unit, *args, **kwargs):
        calls.append(unit.name)
        return dict(entries[unit.name]), []

    monkeypatch.setattr(build_mod, "build_unit", rebuilt)
    build("fp32", out, str(tiny_dir), tensorrt=False, progress=False)
    assert calls == []
    key = cache_key(tiny_dir)
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda path: read_bytes(path) + (
        b"\n# edited\n" if path.name == "stf.py" else b""))
    build("fp32", out, str(tiny_dir), tensorrt=False, progress=False)
    assert sorted(calls) == sorted(set(entries) - {"constants", "llm"})
    assert cache_key(tiny_dir) != key


@torch.no_grad()
def test_llm_folder_reproduces_the_seg_hidden_states(fp32, tiny_dir):
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM

    from virst.prompt import build_prompt

    out, manifest, _ = fp32
    model = VirstModel.from_pretrained(tiny_dir)
    hf = Qwen2ForCausalLM.from_pretrained(out / "llm").eval()
    embed = load_file(str(out / "embed_tokens.safetensors"))["embed_tokens"]
    prompt = build_prompt(model.tokenizer, "the red circle")
    video = torch.randn(32, model.config.llm_hidden)
    ids = lambda x: torch.tensor(x)  # noqa: E731
    inputs = torch.cat([embed[ids(prompt.before)], video, embed[ids(prompt.inference_after)]])
    hidden = hf(inputs_embeds=inputs[None], output_hidden_states=True).hidden_states[-1]
    ref, positions = model.prefill(prompt, video, None)
    assert torch.allclose(hidden[0, positions], ref[0, positions], atol=1e-5)


def test_fp16_and_bf16_graphs_carry_their_precision(tiny_dir, tmp_path):
    units = ["memory_encoder", "seg_prompter"]
    _, checks16 = build("fp16", tmp_path / "f16", str(tiny_dir), units, tensorrt=False,
                        progress=False)
    assert checks16 and all(c.passed for c in checks16)
    assert any(c.metric == "maskmem cosine" and c.value >= 0.999 for c in checks16)
    manifest, checks = build("bf16", tmp_path / "b16", str(tiny_dir), units, tensorrt=False,
                             progress=False)
    # numbers on CPU through the bf16 emulation, each next to torch's own bf16 loss
    assert {c.backend for c in checks} == {"ort-cpu bf16-emul"}
    assert all(c.passed and c.note.startswith("torch bf16:") for c in checks)
    assert all(0.99 < c.value < 1.0 for c in checks)  # bf16 rounding shows, but is small
    m = onnx.load(str(tmp_path / "b16" / "memory_encoder.bf16.onnx"))
    types = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    assert types["features"] == onnx.TensorProto.BFLOAT16
    assert types["mask_logits"] == onnx.TensorProto.FLOAT  # the mask input stays fp32
    # layer norms run in fp32: their data inputs are fp32 casts
    produced = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type == "LayerNormalization":
            src = produced.get(n.input[0])
            assert src is not None and src.op_type == "Cast"
    plan = manifest["artifacts"]["memory_encoder"]["precision_plan"]
    assert plan["precision"] == "bf16" and plan["casts_added"] > 0
    # STF computes in fp32 (its click is an argmax); only its inputs and output are bf16
    stf = manifest["artifacts"]["seg_prompter"]["precision_plan"]
    assert stf["low_nodes"] == 0 and stf["fp32_nodes"] > 0, stf
    with pytest.raises(build_mod.BuildError, match="holds bf16 artifacts"):
        build("fp16", tmp_path / "b16", str(tiny_dir), units, tensorrt=False, progress=False)


def test_build_cli_reports_bad_arguments():
    res = subprocess.run([sys.executable, "-m", "export.build", "--precision", "int4",
                          "--out", "/tmp/never"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown precision 'int4'" in res.stderr


def test_bf16_emulation_rounds_every_bf16_value_and_computes_in_fp32():
    """y = (a @ b) + c with everything bf16: the emulated graph gives exactly
    round_bf16(round_bf16(a) @ round_bf16(b) in fp32) + c, rounded again."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from export.precision import emulate_bf16

    graph = h.make_graph(
        [h.make_node("MatMul", ["a", "b"], ["ab"]), h.make_node("Add", ["ab", "c"], ["y"])],
        "g", [h.make_tensor_value_info(n, T.BFLOAT16, [4, 4]) for n in ("a", "b")],
        [h.make_tensor_value_info("y", T.BFLOAT16, [4, 4])],
        [h.make_tensor("c", T.BFLOAT16, [4, 4], vals=[0.3] * 16)])
    model = emulate_bf16(h.make_model(graph, opset_imports=[h.make_opsetid("", 23)]))
    onnx.checker.check_model(model, full_check=True)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 4, generator=gen), torch.randn(4, 4, generator=gen)

    def rnd(x):
        return x.bfloat16().float()

    want = rnd(rnd(rnd(a) @ rnd(b)) + rnd(torch.full((4, 4), 0.3)))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"a": a.numpy(), "b": b.numpy()})  # inputs rounded inside
    assert torch.equal(torch.from_numpy(got), want)


def test_artifacts_respect_the_umask(fp32):
    """safetensors stages files with mode 0600; every artifact has the umask's mode."""
    import os

    out, _, _ = fp32
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
        p.name: oct(0o666 & ~mask) for p in files}
