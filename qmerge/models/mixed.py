"""A GPTQ checkpoint with per-module overrides (`quantization_config.dynamic`), loaded by GPTQModel.

transformers' own GPTQ path builds every layer with the checkpoint's top-level bits and group size
and would score another model than the one written; GPTQModel's loader reads `dynamic` (8-bit
modules, 16-bit `-:` modules). Its torch kernel computes in float16/bfloat16 only, so the checkpoint
is loaded in float16 (the dtype of its stored scales, so they stay exact), then the 16-bit tensors
it does not quantize are put back as stored and everything computes in float32 (as every other
candidate does): the logits are those of the stored weights dequantized by hand
(tests/test_search.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from qmerge.models.engine import gptqmodel
from qmerge.models.float32 import float32_compute


def has_dynamic(path: Path) -> bool:
    config = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    return bool(config.get("dynamic"))


def load_mixed(path: Path, device: torch.device, trust_remote_code: bool = False) -> torch.nn.Module:
    """The checkpoint through GPTQModel's torch kernel (it supports 2/4/8 bits on any device), computing in float32."""
    engine = gptqmodel()
    model = engine.GPTQModel.load(str(path), device=str(device), dtype=torch.float16, backend="torch", trust_remote_code=trust_remote_code).model
    with torch.no_grad():
        for file in sorted(Path(path).glob("*.safetensors")):
            with safe_open(file, "pt", device=str(device)) as f:
                for key in f.keys():
                    _restore(model, key, f)
    for module in model.modules():
        if hasattr(module, "original_inv_freq"):  # rotary frequencies: recomputed in float32, as a float32 load has them
            module.inv_freq = module.original_inv_freq.to(device=device, dtype=torch.float32)
    return float32_compute(model).eval()


def _restore(model: torch.nn.Module, key: str, f) -> None:
    """Put a stored 16-bit tensor back in its stored dtype (the float16 load rounded bf16 ones)."""
    owner, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return
    current = getattr(module, name, None)
    if isinstance(current, torch.Tensor) and current.is_floating_point() and name != "scales":
        current.data = f.get_tensor(key)
