"""`Runtime`: a VIRST model loaded on one backend, ready to open sessions on videos.

    Runtime(model_dir, backend="onnxruntime")      # artifacts built once, cached
    session = runtime.session("clip.mp4")
    for frame in session.segment(["the red circle", "the square on the left"]):
        frame.masks                                   # (2, H, W) bool

Backends: "eager" and "compiled" run the model's own modules (torch); "onnxruntime" and
"tensorrt" run the exported, verified artifacts (`python -m export.build`). The language
model is torch everywhere, or vLLM (`lm="vllm"`) where it is installed. Every argument is
checked here, before any video is read.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from runtime.artifacts import Artifacts, ensure_artifacts
from runtime.backends.base import Features
from runtime.heap import keep_freed_memory
from runtime.lm import TorchLM, VllmLM
from runtime.session import Session
from runtime.threads import ThreadPlan
from virst.errors import ConfigError, InputError
from virst.preprocess import to_model_input
from virst.prompt import Prompt, build_prompt, load_tokenizer, normalize_expression

BACKENDS = ("eager", "compiled", "onnxruntime", "tensorrt")
ALIASES = {"torch": "eager", "ort": "onnxruntime", "trt": "tensorrt"}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_backend(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def parse_precision(name: str) -> torch.dtype:
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: no CUDA GPU is available here (torch "
                              f"{torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ConfigError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return device


def check_prompt(tokenizer, cfg, expression: str) -> Prompt:
    """The chat prompt, refused when empty or when it cannot fit the model's positions next
    to the longest video the model sees."""
    prompt = build_prompt(tokenizer, expression, cfg.num_seg_tokens)
    video = cfg.max_vlm_frames * cfg.tokens_per_frame
    length = len(prompt.before) + video + len(prompt.inference_after)
    if length > cfg.llm_max_positions:
        raise InputError(f"the expression is too long: {length - video} prompt tokens + "
                         f"{video} video tokens exceed the model's {cfg.llm_max_positions} "
                         f"positions")
    return prompt


class Runtime:
    def __init__(self, model=None, *, backend: str = "eager", device: str = "cpu",
                 precision: str = "fp32", artifacts: str | Path | None = None,
                 threads: int | None = None, lm: str = "torch", encode_batch: int | None = None,
                 tokenizer=None):
        """`model`: a model folder, a loaded `VirstModel`, or None for the embedded default.
        `artifacts`: an export folder for the onnxruntime / tensorrt backends (default:
        built from `model` into the cache). `threads`: cores to use (default: all this
        process may run on)."""
        self.backend_name = parse_backend(backend)
        self.device = parse_device(device)
        self.dtype = parse_precision(precision)
        self.precision = precision
        if lm not in ("torch", "vllm"):
            raise ConfigError(f"unknown language-model runner {lm!r}; choose torch or vllm")
        self.threads = ThreadPlan.for_cores(threads)
        self.threads.apply()
        keep_freed_memory()  # no page faults on each frame's buffers (runtime/heap.py)
        # independent batches (image encoder, anchors) on both compute threads: a CPU's
        # cores; a GPU runs them one after the other (one TensorRT context per engine)
        self.compute_workers = 2 if self.threads.encoder_thread and self.device.type == "cpu" \
            else 1
        # one pool for every video: its threads keep their per-thread caches (runtime/threads.py)
        self.pool = ThreadPoolExecutor(self.compute_workers, thread_name_prefix="virst-compute")
        # FFmpeg's own decoding threads where the cores do not compute (a GPU's host: 720p
        # decoding took 7.5 ms a frame on one thread of an H200's host, 3.6 ms with these);
        # on a CPU the compute threads have the cores
        self.decode_threads = 1 if self.device.type == "cpu" else min(8, self.threads.cores)
        # one frame at a time on a CPU: larger batches fall out of cache and run slower per
        # frame (measured: ONNX Runtime 7.6 ms/frame at 1, 9.8 at 16); a GPU wants batches
        self.encode_batch = encode_batch or (1 if self.device.type == "cpu" else 16)
        # pass 2 starts before the language model and the anchors on a GPU, whose queue
        # would run dry meanwhile; on a CPU after them (runtime/session.py)
        self.pass_2_early = self.device.type == "cuda"
        if self.backend_name in ("eager", "compiled"):
            self._load_torch(model)
        else:
            self._load_artifacts(model, artifacts, lm)
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if self.tokenizer is None:
            raise ConfigError("this model has no tokenizer (tokenizer.json in its folder)")
        self.config = self.backend.config

    # --------------------------------------------------------------- loading
    def _load_torch(self, model) -> None:
        from runtime.backends.compiled import CompiledBackend
        from runtime.backends.eager import EagerBackend
        from virst.model import VirstModel

        if not isinstance(model, VirstModel):
            from virst.cli import DEFAULT_MODEL_DIR

            model = VirstModel.from_pretrained(model or DEFAULT_MODEL_DIR, self.device)
        model = model.to(self.device, self.dtype).eval()
        cls = CompiledBackend if self.backend_name == "compiled" else EagerBackend
        self.backend = cls(model, self.device)
        self.tokenizer = model.tokenizer
        fusion = model.initial_seg_fusion if model.config.initial_seg_fusion else None
        self.lm = TorchLM(model.vlm.llm, fusion)

    def _load_artifacts(self, model, artifacts, lm: str) -> None:
        from virst.cli import DEFAULT_MODEL_DIR

        model_dir = None if model is None and artifacts else Path(model or DEFAULT_MODEL_DIR)
        arts = (Artifacts(artifacts, self.precision, model_dir) if artifacts
                else ensure_artifacts(model_dir, self.precision))
        if arts.config.initial_seg_fusion:
            raise ConfigError("stage-1 STF (initial_seg_fusion) is not exported; use the "
                              "eager or compiled backend for this model")
        if self.backend_name == "onnxruntime":
            from runtime.backends.ort import OrtBackend

            self.backend = OrtBackend(arts, self.device, self.threads.intra_op)
        else:
            from runtime.backends.trt import TensorRTBackend

            self.backend = TensorRTBackend(arts, self.device)
        self.tokenizer = load_tokenizer(arts.llm_folder)
        self.lm = (VllmLM(arts.folder) if lm == "vllm"
                   else TorchLM.from_folder(arts.llm_folder, self.device, self.dtype))

    # ------------------------------------------------------------ expressions
    def build_prompt(self, expression: str) -> Prompt:
        return check_prompt(self.tokenizer, self.config, expression)

    def unknown_words(self, expression: str) -> list[str]:
        """Words the tokenizer maps to its unknown token (they reach the model as [UNK])."""
        unk = self.tokenizer.token_to_id("[UNK]")
        if unk is None:
            return []
        text = normalize_expression(expression)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk]

    def check_expressions(self, expressions: list[str]) -> None:
        """Refuse empty or over-long expressions; warn about unknown words, naming them."""
        if not expressions:
            raise InputError("no expression given: describe the object to segment")
        for text in expressions:
            self.build_prompt(text)
            words = self.unknown_words(text)
            if words:
                print(f"warning: the model does not know {', '.join(map(repr, words))} in "
                      f"{text!r}; they reach it as [UNK]", file=sys.stderr)

    # ------------------------------------------------------------------- runs
    def encode(self, frames: list[np.ndarray]) -> Features:
        """SAM2 features of RGB frames, `encode_batch` at a time (padded to it when the
        backend compiles fixed shapes)."""
        cfg, parts = self.config, []
        for i in range(0, len(frames), self.encode_batch):
            chunk = frames[i : i + self.encode_batch]
            pixels = to_model_input(np.stack(chunk), cfg.sam_image_size, cfg.sam_resize,
                                    self.device, self.dtype)
            n = len(chunk)
            if self.backend_name == "compiled" and n < self.encode_batch:
                pad = pixels[-1:].expand(self.encode_batch - n, -1, -1, -1)
                pixels = torch.cat([pixels, pad])
            parts.append(self.backend.encode(pixels).take(slice(0, n)))
        return parts[0] if len(parts) == 1 else Features.cat(parts)

    def session(self, video, seed: int | None = None, allow_truncated: bool = False) -> Session:
        return Session(self, video, seed, allow_truncated)

    def describe(self) -> str:
        return (f"{self.backend.describe()}; {self.threads.describe()}; image encoder and "
                f"anchors on {self.compute_workers} compute thread(s)")
