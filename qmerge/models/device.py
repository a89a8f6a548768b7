"""The device a run computes on, and what the report records of it."""

from __future__ import annotations

import platform

import torch

from qmerge.errors import QmergeError
from qmerge.models.precision import describe


def pick_device(name: str) -> torch.device:
    """--device: auto takes a GPU when torch sees one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QmergeError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "platform": platform.platform(), "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
            "bf16": describe(torch.bfloat16, device)}  # "emulated": GPTQ and the noise floor computed in float32
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
