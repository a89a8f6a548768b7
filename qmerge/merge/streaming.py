"""The adapters' edits (qmerge.merge.edits) of the weights as trained, streamed tensor by tensor from the
base into HF-style shards.

Only one base tensor (plus the current output shard) is in memory at a time; the NF4 round trip and
the LoRA product run on the GPU when there is one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from qmerge.merge.adapter import Adapter, Mix, Weighted
from qmerge.io.checkpoint import INDEX_NAME, ShardWriter
from qmerge.merge.edits import build_edits
from qmerge.merge.lora import LoraDelta
from qmerge.io.dtypes import torch_dtype
from qmerge.io.progress import track
from qmerge.merge.source import as_trained
from qmerge.settings import NF4Settings

WEIGHT_FILES = ("*.safetensors", INDEX_NAME, "*.bin", "*.pt", "*.pth", "*.gguf")


@dataclass(frozen=True)
class MergeResult:
    nf4_modules: int  # linear layers read as their 4-bit values (round trip, or stored codes dequantized)
    lora_modules: int  # layers that received a LoRA delta
    tensors: int
    untied_embeddings: bool = False  # lm_head written on its own: the edits made it differ from the tied embedding


def merge(
    base_dir: Path,
    adapter: Adapter | Mix | None,
    out_dir: Path,
    nf4: NF4Settings,
    dtype: str,
    device: torch.device,
    into: str = "nf4",
    show_progress: bool | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> MergeResult:
    """Write `out_dir` as a plain HF checkpoint of (NF4-round-tripped or original) base + adapter.

    into="nf4": the weights the adapter was trained against (qmerge's default);
    into="original": the 16-bit weights, as PEFT on fp16 / unsloth / LLaMA-Factory merge.
    A pre-quantized bitsandbytes 4-bit base is read from its stored tensors (into="nf4" only).
    adapter: one adapter, a mix of weighted adapters (Σ weight·Δ), or None for the base's 4-bit weights alone.
    """
    from qmerge.io.inputs import load_base_config

    config = load_base_config(base_dir, trust_remote_code)
    source = as_trained(base_dir, config, nf4, into, allow_pickle, trust_remote_code)
    mix = (Weighted(adapter),) if isinstance(adapter, Adapter) else adapter or ()
    edits = build_edits(mix, config, source, trust_remote_code)
    out_dtype = torch_dtype(dtype)
    writer = ShardWriter(out_dir)
    keys = source.keys()
    for key in track(keys, "merge", "tensor", enabled=show_progress):  # None: as the caller's context says (qmerge.io.progress)
        tensor = source.get(key, device)
        writer.add(key, _stored(edits.apply(key, tensor, device), out_dtype))
    for key, tensor in edits.extra_tensors():
        writer.add(key, _stored(tensor, out_dtype))
    writer.finish()
    if edits.untied:
        config.tie_word_embeddings = False
    _write_metadata(base_dir, out_dir, config, dtype)
    return MergeResult(len(source.quantized), edits.count(LoraDelta), len(keys), edits.untied)


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (tensor.to(dtype=dtype) if tensor.is_floating_point() else tensor).cpu()


def _write_metadata(base_dir: Path, out_dir: Path, config, dtype: str) -> None:
    """Tokenizer, chat template, generation config copied; config without quantization_config."""
    for p in base_dir.iterdir():
        if p.is_file() and p.name != "config.json" and not any(p.match(g) for g in WEIGHT_FILES):
            shutil.copy2(p, out_dir / p.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype(dtype)
    config.save_pretrained(out_dir)
