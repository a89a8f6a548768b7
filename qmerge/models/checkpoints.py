"""Candidate models from checkpoints on disk (a merged or GPTQ checkpoint) and the baselines built in
memory from the base (the adapter merged into the original 16-bit weights; the base alone)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qmerge.errors import QmergeError
from qmerge.io.dtypes import torch_dtype
from qmerge.io.inputs import quantization_method
from qmerge.merge.adapter import Mix
from qmerge.merge.edits import apply_to_model
from qmerge.models.base import load_base
from qmerge.models.float32 import float32_compute, round_stored
from qmerge.models.loading import from_pretrained
from qmerge.models.placement import Mapped, Placement, as_placement, load_kwargs, wrap_offloaded


def load_candidate(path: Path, where: torch.device | Placement, trust_remote_code: bool = False):
    """A float checkpoint (DIR/merged) through plain transformers, in its stored dtype, computing in
    float32 (see float32_compute), resident, spread or streamed as `where` says (models.placement); a
    load that misses or ignores a tensor is refused. A quantized checkpoint made elsewhere
    (--checkpoint: AWQ, bitsandbytes 4-bit, a GPTQ format other than v1) loads through transformers
    and its kernels, in candidate_dtype, never streamed. (A GPTQ v1 checkpoint, qmerge's own, is read
    as its float32 weights by qmerge.quant.gptq_float.)"""
    place = as_placement(where)
    if is_quantized(path):
        load = load_kwargs(replace(place, stream=None), None, trust_remote_code)
        return AutoModelForCausalLM.from_pretrained(path, dtype=candidate_dtype(path, place.device), trust_remote_code=trust_remote_code, **load).eval()
    load = load_kwargs(place, AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), trust_remote_code)
    return float32_compute(from_pretrained(path, "the checkpoint", dtype="auto", trust_remote_code=trust_remote_code, **load)).eval()


def candidate_dtype(path: Path, device: torch.device) -> torch.dtype:
    """The dtype a checkpoint made elsewhere computes in: float32, except a quantized one on CUDA,
    where its kernels (Marlin, AWQ's) compute in float16 only, as servers run them."""
    return torch.float16 if is_quantized(path) and device.type == "cuda" else torch.float32


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


def is_quantized(path: Path) -> bool:
    """A checkpoint whose config carries a quantization_config (GPTQ, bitsandbytes, ...)."""
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

