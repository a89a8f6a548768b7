"""The one dtype table: a dtype's name in settings, its torch type, its safetensors code and its size.

Settings name dtypes by string (recipes, flags, report.json); checkpoints name them by safetensors
code; computation needs the torch type. One row per dtype keeps the three in agreement."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dtype:
    name: str  # as settings and reports write it
    torch: torch.dtype
    code: str  # safetensors header dtype
    itemsize: int


TABLE = tuple(
    Dtype(name, getattr(torch, name), code, size)
    for name, code, size in (
        ("float64", "F64", 8), ("float32", "F32", 4), ("float16", "F16", 2), ("bfloat16", "BF16", 2),
        ("int64", "I64", 8), ("int32", "I32", 4), ("int16", "I16", 2), ("int8", "I8", 1), ("uint8", "U8", 1), ("bool", "BOOL", 1),
        ("float8_e4m3fn", "F8_E4M3", 1), ("float8_e5m2", "F8_E5M2", 1),
    )
)
BY_NAME = {d.name: d for d in TABLE}
BY_TORCH = {d.torch: d for d in TABLE}
BY_CODE = {d.code: d for d in TABLE}


def torch_dtype(name: str) -> torch.dtype:
    """"bfloat16" → torch.bfloat16 (names as settings and recipes write them)."""
    return BY_NAME[name].torch


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → "bfloat16"."""
    return BY_TORCH[dtype].name
