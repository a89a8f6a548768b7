"""Size on disk and bits per weight of each candidate, in one definition for all of them.

size_bytes: the bytes of tensor data a candidate's weight files hold (safetensors headers, a few KB,
left out): read from the headers of a written checkpoint, and computed exactly for the format of a
candidate built in memory (its quantized tensors as that format stores them, every other tensor in
the stored dtype of DIR/merged). bits_per_weight: 8 × the bytes of the linear layers that get
quantized (codes, scales, zero points, indices and 4-bit statistics included) over their number of
weight parameters, so 16 for bf16 and 4 plus the format's overhead for 4-bit formats.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from qmerge.io.dtypes import BY_CODE
from qmerge.settings import GPTQSettings


def checkpoint_layout(directory: Path) -> dict[str, int]:
    """Bytes of each tensor in a checkpoint's safetensors files (shards included)."""
    layout = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                layout[key] = BY_CODE[s.get_dtype()].itemsize * _numel(s.get_shape())
    return layout


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def module_of(key: str, linears: set[str]) -> str | None:
    """The quantized linear layer a tensor belongs to ("a.q_proj.weight.absmax" → "a.q_proj"), or None."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in linears:
            return prefix
    return None


def with_linears(layout: dict[str, int], linears: set[str], replacement: dict[str, int]) -> dict[str, int]:
    """`layout` with the weights of the linear layers replaced by another format's tensors (biases
    stay 16-bit tensors of their own in every format here)."""
    kept = {k: v for k, v in layout.items() if module_of(k, linears) is None or k.endswith(".bias")}
    return {**kept, **replacement}


def gptq_tensors(shapes: dict[str, tuple[int, int]], gptq: GPTQSettings) -> dict[str, int]:
    """What a GPTQ v1 checkpoint (int32 packing) stores per linear layer: qweight (in·bits/32, out),
    qzeros (groups, out·bits/32) int32, scales (groups, out) float16, g_idx (in) int32."""
    out = {}
    for name, (rows, cols) in shapes.items():
        groups = 1 if gptq.group_size == -1 else cols // gptq.group_size
        out[f"{name}.qweight"] = cols * rows * gptq.bits // 8
        out[f"{name}.qzeros"] = groups * rows * gptq.bits // 8
        out[f"{name}.scales"] = groups * rows * 2
        out[f"{name}.g_idx"] = cols * 4
    return out


def state_tensors(model: torch.nn.Module, linears: set[str]) -> dict[str, int]:
    """The tensors of the linear layers as the model's own state_dict serializes them (bitsandbytes:
    packed 4-bit codes plus absmax, nested statistics and quant-state tensors)."""
    return {k: t.nbytes for k, t in model.state_dict().items() if module_of(k, linears) is not None and not k.endswith(".bias")}


def summary(layout: dict[str, int], shapes: dict[str, tuple[int, int]]) -> tuple[int, float]:
    """(size_bytes, bits_per_weight) of a layout."""
    linear_bytes = sum(v for k, v in layout.items() if module_of(k, set(shapes)) is not None)
    params = sum(r * c for r, c in shapes.values())
    return sum(layout.values()), 8 * linear_bytes / params
