"""ONNX Runtime: the exported units, CPU or CUDA provider. The provider a session really got
is checked: a CUDA request that ONNX Runtime silently serves on the CPU is an error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runtime.artifacts import Artifacts
from runtime.backends.base import RUNTIME_UNITS, Backend
from virst.errors import ConfigError

NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
         "tensor(bfloat16)": None}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, artifacts: Artifacts, device: torch.device, threads: int = 1):
        import onnxruntime as ort

        if device.type not in PROVIDERS:
            raise ConfigError(f"ONNX Runtime runs on cpu or cuda, not {device}")
        provider = PROVIDERS[device.type]
        if provider not in ort.get_available_providers():
            raise ConfigError(f"this onnxruntime has no {provider} (it has "
                              f"{', '.join(ort.get_available_providers())}); install "
                              f"onnxruntime-gpu for CUDA")
        if device.type == "cpu" and artifacts.precision == "bf16":
            raise ConfigError(f"{artifacts.folder} holds bf16 graphs; ONNX Runtime's CPU "
                              f"provider has no bf16 kernels: build fp32 or fp16 artifacts "
                              f"(python -m export.build --precision fp32) or run on a GPU")
        self.config, self.device = artifacts.config, device
        self.constants, self.artifacts = artifacts.constants(), artifacts
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.sessions = {}
        for unit in RUNTIME_UNITS:
            path = artifacts.onnx_file(unit)
            sess = ort.InferenceSession(str(path), opts, providers=[provider])
            got = sess.get_providers()
            if got[0] != provider:
                raise ConfigError(f"ONNX Runtime serves {unit} on {got[0]}, not {provider} "
                                  f"as asked (a silent fallback is refused)")
            self.sessions[unit] = sess
        self.provider = provider

    def _run(self, unit: str, *args: torch.Tensor) -> list[torch.Tensor]:
        sess = self.sessions[unit]
        feeds = {}
        for spec, x in zip(sess.get_inputs(), args):
            arr = x.detach().to("cpu", torch.float32).numpy()
            feeds[spec.name] = arr.astype(NUMPY[spec.type], copy=False)
        outs = sess.run(None, feeds)
        return [torch.from_numpy(o).float().to(self.device) for o in outs]

    def describe(self) -> str:
        import onnxruntime as ort

        return (f"onnxruntime {ort.__version__} {self.provider}, {self.artifacts.precision} "
                f"artifacts in {Path(self.artifacts.folder)}")
