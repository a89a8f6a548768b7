"""Candidate models from checkpoints on disk (a merged or GPTQ checkpoint) and the baselines built in
memory from the base (the adapter merged into the original 16-bit weights; the base alone)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from qmerge.errors import QmergeError
from qmerge.io.dtypes import torch_dtype
from qmerge.io.inputs import quantization_method
from qmerge.merge.adapter import Mix
from qmerge.merge.edits import apply_to_model
from qmerge.models.base import load_base
from qmerge.models.float32 import float32_compute
from qmerge.models.mixed import has_dynamic, load_mixed


def candidate_dtype(path: Path, device: torch.device) -> torch.dtype:
    """The dtype a candidate computes in: float32, except a quantized checkpoint on CUDA: GPTQModel
    picks Marlin there, which computes in float16 only (as servers run it); one with per-module
    overrides is loaded by GPTQModel's torch kernel and computes in float32 everywhere."""
    return torch.float16 if _quantized(path) and not has_dynamic(path) and device.type == "cuda" else torch.float32


def load_candidate(path: Path, device: torch.device, trust_remote_code: bool = False):
    """A merged or GPTQ checkpoint through plain transformers (GPTQ via its quantization_config); a
    float checkpoint in its stored dtype, computing in float32 (see float32_compute)."""
    load = dict(device_map={"": device}, trust_remote_code=trust_remote_code)
    if _quantized(path) and has_dynamic(path):
        return load_mixed(path, device, trust_remote_code)  # per-module overrides: only GPTQModel's loader honours them
    if _quantized(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=candidate_dtype(path, device), **load).eval()
    return float32_compute(AutoModelForCausalLM.from_pretrained(path, dtype="auto", **load)).eval()


SCORED = ("gptq", "awq", "bitsandbytes 4-bit")  # quantizations a candidate may have: transformers loads them here (GPTQ and AWQ through GPTQModel)


def check_loadable(path: Path, name: str) -> None:
    """A checkpoint made elsewhere (--checkpoint) must be a transformers checkpoint, 16-bit or of a
    quantization transformers loads here; others are refused by name before any work."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise QmergeError(f"checkpoint {name} ({path}) has no config.json; pass a Hugging Face checkpoint folder or hub id")
    quantization = json.loads(config.read_text()).get("quantization_config")
    method = quantization_method(quantization) if quantization else None
    if method is not None and method not in SCORED:
        raise QmergeError(f"checkpoint {name} is quantized with {method}, which qmerge cannot load to evaluate; pass a GPTQ, AWQ, bitsandbytes 4-bit or 16-bit checkpoint")


def _quantized(path: Path) -> bool:
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
