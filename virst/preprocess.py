"""Frames to model inputs: RGB uint8 (T, H, W, 3) -> normalised float (T, 3, S, S).

Both the VLM (448 px) and SAM2 (1024 px) take square, aspect-free resizes with ImageNet
statistics. One resize path, with the kernel chosen in the config.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_model_input(frames: np.ndarray, size: int, mode: str = "bicubic",
                   device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """Resize (antialiased, clamped to [0, 1] like an 8-bit image) and normalise."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    # one frame-sized copy, divided in place; copy=True so that float32 input on the CPU
    # (which .to would return as a view of the caller's array) is never changed
    x = x.permute(0, 3, 1, 2).to(torch.float32, copy=True).div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)
