"""What the device offers the kernels (one place, so that tests can stand in for a GPU)."""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["capability", "sdpa_runs_cudnn", "has_torch_varlen"]


def capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def sdpa_runs_cudnn(device: torch.device) -> bool:
    """Whether SDPA runs cuDNN's attention here: what it picks on Hopper and newer, unless disabled."""
    return device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled() and capability(device)[0] >= 9


def has_torch_varlen(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("torch.nn.attention.varlen") is not None
