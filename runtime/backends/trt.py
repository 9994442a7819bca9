"""TensorRT: engines that `python -m export.build` built from the ONNX units (manifest
entries "trt:<unit>"), run through TensorRT's Python runtime on torch CUDA tensors.
The `trt` module is passed in so that the plumbing can be tested against a fake where
TensorRT cannot be installed."""

from __future__ import annotations

import torch

from runtime.artifacts import Artifacts
from runtime.backends.base import RUNTIME_UNITS, Backend
from virst.errors import CheckpointError, ConfigError


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.BF16: torch.bfloat16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
    return table[dtype]


class EngineRunner:
    """One engine: inputs bound by address, outputs allocated at the shapes the engine
    infers from the inputs, one `execute_async_v3` on the current stream."""

    def __init__(self, trt, path, device: torch.device):
        self.trt, self.device = trt, device
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise CheckpointError(f"TensorRT cannot load {path} (built by another TensorRT "
                                  f"version or for another GPU?): rebuild the engines")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        keep = []
        for name, x in zip(self.inputs, args):
            x = x.to(self.device, _torch_dtype(self.trt, self.engine.get_tensor_dtype(name)))
            x = x.contiguous()
            keep.append(x)
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            out = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        stream = torch.cuda.current_stream().cuda_stream if self.device.type == "cuda" else 0
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execution failed")
        return [o.float() for o in outs]


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, artifacts: Artifacts, device: torch.device, trt=None):
        if trt is None:
            from export.tensorrt import tensorrt_status

            trt, reason = tensorrt_status()
            if trt is None:
                raise ConfigError(f"the tensorrt backend is not available: {reason}")
        self.config, self.device, self.artifacts = artifacts.config, device, artifacts
        self.constants = {k: v.to(device) for k, v in artifacts.constants().items()}
        self.runners = {}
        for unit in RUNTIME_UNITS:
            files = artifacts.manifest["artifacts"].get(f"trt:{unit}", {}).get("files")
            if not files:
                raise CheckpointError(f"{artifacts.folder} has no TensorRT engine for {unit}: "
                                      f"build the artifacts on this GPU with TensorRT installed")
            self.runners[unit] = EngineRunner(trt, artifacts.folder / next(iter(files)), device)
        self.trt_version = trt.__version__

    def _run(self, unit: str, *args: torch.Tensor) -> list[torch.Tensor]:
        return self.runners[unit](*args)

    def describe(self) -> str:
        return (f"TensorRT {self.trt_version} on {self.device}, {self.artifacts.precision} "
                f"engines in {self.artifacts.folder}")
