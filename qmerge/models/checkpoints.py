"""Candidate models from checkpoints on disk (a merged or GPTQ checkpoint) and the baselines built in
memory from the base (the adapter merged into the original 16-bit weights; the base alone)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qmerge.errors import QmergeError
from qmerge.io.dtypes import torch_dtype
from qmerge.merge.adapter import Mix
from qmerge.merge.edits import apply_to_model
from qmerge.models.base import load_base
from qmerge.models.float32 import float32_compute
from qmerge.models.loading import from_pretrained


def load_candidate(path: Path, device: torch.device, trust_remote_code: bool = False):
    """A float checkpoint (DIR/merged) through plain transformers, in its stored dtype, computing in
    float32 (see float32_compute); a load that misses or ignores a tensor is refused. (A GPTQ
    checkpoint is read by qmerge.quant.gptq_float.)"""
    if is_quantized(path):
        raise QmergeError(f"{path} is a quantized checkpoint; load it with qmerge.quant.gptq_float.load_float32")
    model = from_pretrained(path, "the checkpoint", dtype="auto", device_map={"": device}, trust_remote_code=trust_remote_code)
    return float32_compute(model).eval()


def is_quantized(path: Path) -> bool:
    """A checkpoint whose config carries a quantization_config (GPTQ, bitsandbytes, ...)."""
    return "quantization_config" in json.loads((Path(path) / "config.json").read_text())


def load_baseline(kind: str, base_dir: Path, mix: Mix, device: torch.device, trust_remote_code: bool = False, store_dtype: str | None = None):
    """Built in memory: "original" adds the adapter to the original 16-bit weights (what most merge
    tools do), rounded to `store_dtype` as a merged checkpoint stores it; "base" is the base model
    without the adapter (context: how far the fine-tune itself moved the model)."""
    model = load_base(base_dir, None, device, "lora", trust_remote_code)  # a pre-quantized base has no "original" row
    if kind == "original":
        apply_to_model(model, mix, device)
        if store_dtype is not None:
            model = float32_compute(model.to(torch_dtype(store_dtype)))
    return model.eval()
