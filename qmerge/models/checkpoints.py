"""Candidate models from checkpoints on disk (a merged or GPTQ checkpoint) and the baselines built in
memory from the base (the adapter merged into the original 16-bit weights; the base alone)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qmerge.io.dtypes import torch_dtype
from qmerge.merge.adapter import Mix
from qmerge.merge.edits import apply_to_model
from qmerge.models.base import load_base
from qmerge.models.float32 import float32_compute, round_stored
from qmerge.models.placement import Mapped, Placement, as_placement, load_kwargs, wrap_offloaded


def candidate_dtype(path: Path, device: torch.device) -> torch.dtype:
    """The dtype a candidate computes in: float32, except a quantized checkpoint on CUDA: GPTQModel
    picks Marlin there, which computes in float16 only (as servers run it)."""
    return torch.float16 if _quantized(path) and device.type == "cuda" else torch.float32


def load_candidate(path: Path, where: torch.device | Placement, trust_remote_code: bool = False):
    """A merged or GPTQ checkpoint through plain transformers (GPTQ via its quantization_config, never
    streamed); a float checkpoint in its stored dtype, computing in float32 (see float32_compute),
    resident, spread or streamed as `where` says (models.placement)."""
    place = as_placement(where)
    if _quantized(path):  # GPTQ (a pre-quantized bitsandbytes base goes through load_base)
        load = load_kwargs(replace(place, stream=None), None, trust_remote_code)
        return AutoModelForCausalLM.from_pretrained(path, dtype=candidate_dtype(path, place.device), trust_remote_code=trust_remote_code, **load).eval()
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    load = load_kwargs(place, config, trust_remote_code)
    return float32_compute(AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code, **load)).eval()


def _quantized(path: Path) -> bool:
    return "quantization_config" in json.loads((Path(path) / "config.json").read_text())


def load_baseline(kind: str, base_dir: Path, mix: Mix, device: torch.device | Placement, trust_remote_code: bool = False, store_dtype: str | None = None):
    """Built in memory: "original" adds the adapter to the original 16-bit weights (what most merge
    tools do), each edited tensor rounded to `store_dtype` as a merged checkpoint stores it; "base" is
    the base model without the adapter (context: how far the fine-tune itself moved the model). Both
    held in the base's stored precision and computing in float32 (a pre-quantized base as stored, in
    4-bit: it has no "original" row)."""
    config = json.loads((Path(base_dir) / "config.json").read_text())
    if config.get("quantization_config"):
        return load_base(base_dir, None, as_placement(device).device, "lora", trust_remote_code).eval()
    model = load_candidate(base_dir, device, trust_remote_code)
    if kind == "original":
        dtype = torch_dtype(store_dtype) if store_dtype is not None else None
        place = as_placement(device)
        edits = apply_to_model(model, mix, place.device, dtype)
        if dtype is not None:
            round_stored(model, dtype)
        wrap_offloaded(model, lambda loader: Mapped(loader, lambda key, t: _stored(edits.apply(key, t, place.device), dtype)))
    return model


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """An edited tensor of a streamed "original" row as a merged checkpoint stores it."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

