"""Frames to model inputs: RGB uint8 (T, H, W, 3) -> normalised float (T, 3, S, S).

Both the VLM (448 px) and SAM2 (1024 px) take square, aspect-free resizes with ImageNet
statistics. One resize path, with the kernel chosen in the config.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_model_input(frames: np.ndarray, size: int, mode: str = "bicubic",
                   device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """Resize (antialiased, clamped to [0, 1] like an 8-bit image) and normalise."""
    x = to_device(torch.from_numpy(np.ascontiguousarray(frames)), torch.device(device))
    # one frame-sized copy, divided in place; copy=True so that float32 input on the CPU
    # (which .to would return as a view of the caller's array) is never changed
    x = x.permute(0, 3, 1, 2).to(torch.float32, copy=True).div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    mean, std = _normalisation(x.device)
    return ((x - mean) / std).to(dtype)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On a GPU through pinned memory, without waiting: a copy from pageable memory blocks
    the calling thread until the device has run all the work queued before it (measured on
    an H200: the runtime's threads stalled there, the GPU 56 % busy)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@lru_cache(maxsize=8)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std (1, 3, 1, 1) on `device`, made once (not a copy per call)."""
    return tuple(to_device(torch.tensor(v).view(1, 3, 1, 1), device)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))
