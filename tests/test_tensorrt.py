"""TensorRT planning (real) and the adapter (against a fake `tensorrt` module).

TensorRT cannot be installed on these machines (its PyPI wheels download from a host we
cannot reach), so the adapter is exercised with `FakeTRT`, a stand-in that records the
calls a TensorRT 10/11 build makes; the planning code runs unchanged."""

import types

import pytest

from export.tensorrt import Profile, build_engine, dynamic_ranges, engine_key, plan_profile
from virst.config import preset


class FakeTRT(types.SimpleNamespace):
    def __init__(self, version="11.0.0", typed=True, parse_ok=True, build_ok=True):
        calls = []
        flags = {"STRONGLY_TYPED": 1} if typed else {}
        if version.startswith("8"):
            flags["EXPLICIT_BATCH"] = 0

        class Obj:
            def __init__(self, name):
                self._name = name

            def __getattr__(self, attr):
                def call(*args, **kwargs):
                    calls.append((f"{self._name}.{attr}", args))
                    if attr == "parse_from_file":
                        return parse_ok
                    if attr == "build_serialized_network":
                        return b"ENGINE" if build_ok else None
                    if attr == "create_timing_cache":
                        return Obj("timing_cache")
                    if attr == "get_timing_cache":
                        return Obj("timing_cache")
                    if attr == "serialize":
                        return b"CACHE"
                    if attr in ("create_network", "create_builder_config",
                                "create_optimization_profile"):
                        return Obj(attr)
                    if attr == "get_error":
                        return "unsupported node"
                    return None
                return call

        super().__init__(
            __version__=version, calls=calls,
            Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda s, *a: None}),
            Builder=lambda logger: Obj("builder"), OnnxParser=lambda net, log: parser,
            NetworkDefinitionCreationFlag=types.SimpleNamespace(**flags),
            MemoryPoolType=types.SimpleNamespace(WORKSPACE=0))
        parser = Obj("parser")
        parser.num_errors = 1


INPUTS = [{"name": "features", "shape": ["batch", 64, 16, 16]},
          {"name": "memory", "shape": [1, "memory_tokens", 16]}]


def test_profiles_come_from_the_named_dynamic_axes():
    cfg = preset("tiny")
    ranges = dynamic_ranges(cfg)
    assert ranges["memory_tokens"] == (256, 9 * 256, 9 * 256)  # 1..9 memory frames of 16x16
    profile = plan_profile(INPUTS, cfg)
    assert profile.shapes["features"] == ((1, 64, 16, 16), (4, 64, 16, 16), (16, 64, 16, 16))
    assert profile.shapes["memory"][2] == (1, 9 * 256, 16)
    with pytest.raises(ValueError, match="no range for dynamic axis 'frames'"):
        plan_profile([{"name": "x", "shape": ["frames"]}], cfg)


def test_engine_key_changes_with_every_ingredient():
    p = Profile({"x": ((1,), (2,), (3,))})
    base = engine_key("abc", "10.8", "H100", "bf16", p)
    assert base == engine_key("abc", "10.8", "H100", "bf16", p)
    others = [engine_key("abd", "10.8", "H100", "bf16", p),
              engine_key("abc", "11.0", "H100", "bf16", p),
              engine_key("abc", "10.8", "H200", "bf16", p),
              engine_key("abc", "10.8", "H100", "fp16", p),
              engine_key("abc", "10.8", "H100", "bf16", Profile({"x": ((1,), (2,), (4,))}))]
    assert len({base, *others}) == 6


@pytest.mark.parametrize("version", ["10.8.0", "11.0.0"])
def test_adapter_builds_strongly_typed_with_profile_and_caches(tmp_path, version):
    trt = FakeTRT(version)
    onnx_path = tmp_path / "unit.onnx"
    onnx_path.write_bytes(b"onnx")
    profile = plan_profile(INPUTS, preset("tiny"))
    cache = tmp_path / "timing.cache"
    path, built = build_engine(trt, onnx_path, tmp_path / "e", profile, "bf16", "H100", "h1",
                               cache)
    assert built and path.read_bytes() == b"ENGINE" and cache.read_bytes() == b"CACHE"
    names = [c[0] for c in trt.calls]
    assert ("builder.create_network", (2,)) in trt.calls  # 1 << STRONGLY_TYPED, no batch flag
    assert names.count("create_optimization_profile.set_shape") == 2
    assert "create_builder_config.set_timing_cache" in names
    assert not any("set_flag" in n for n in names)  # no FP16/BF16 builder flags
    trt.calls.clear()
    again, built = build_engine(trt, onnx_path, tmp_path / "e", profile, "bf16", "H100", "h1",
                                cache)
    assert again == path and not built and trt.calls == []  # engine cache hit


def test_adapter_errors_are_clear(tmp_path):
    onnx_path = tmp_path / "unit.onnx"
    onnx_path.write_bytes(b"onnx")
    profile = plan_profile(INPUTS[:1], preset("tiny"))
    args = (onnx_path, tmp_path / "e", profile, "bf16", "H100", "h", tmp_path / "c")
    with pytest.raises(RuntimeError, match="cannot parse unit.onnx: unsupported node"):
        build_engine(FakeTRT(parse_ok=False), *args)
    with pytest.raises(RuntimeError, match="failed to build"):
        build_engine(FakeTRT(build_ok=False), *args)
    with pytest.raises(RuntimeError, match="strongly typed"):
        build_engine(FakeTRT(version="8.6.1", typed=False), *args)
