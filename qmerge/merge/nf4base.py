"""The base as the training run's load quantized it, written once per run as a bitsandbytes 4-bit
checkpoint (the layout transformers' save_pretrained writes for a 4-bit model, which it loads back
without quantizing): the merge reads its codes, and verify and drift load their reference from it,
instead of each quantizing the base again (on CPU bitsandbytes quantizes ~16M weights/s: three
quantizations of an 8B base cost minutes). Streamed tensor by tensor, so it holds one tensor at a
time whatever the base's size."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from qmerge.io.checkpoint import ShardWriter
from qmerge.merge.nf4 import bnb_config, quantize
from qmerge.merge.source import as_trained
from qmerge.merge.streaming import WEIGHT_FILES
from qmerge.settings import NF4Settings


def write_nf4_base(base_dir: Path, out_dir: Path, nf4: NF4Settings, device: torch.device, allow_pickle: bool = False, trust_remote_code: bool = False) -> int:
    """DIR/nf4 from a 16-bit base (a pre-quantized base is already one): each linear layer bitsandbytes quantizes as its packed codes and
    QuantState tensors (`QuantState.as_dict(packed=True)`, as Linear4bit saves them), every other
    tensor as stored; the config with the training run's quantization_config; tokenizer and the
    other files copied. Returns the number of quantized weights."""
    from qmerge.io.inputs import load_base_config

    config = load_base_config(base_dir, trust_remote_code)
    source = as_trained(base_dir, config, nf4, "nf4", allow_pickle, trust_remote_code)
    writer = ShardWriter(out_dir)
    for key in source.keys():
        tensor = source.base.get(key)
        if key not in source.quantized:
            writer.add(key, tensor)
            continue
        packed, state = quantize(tensor, nf4, device)
        writer.add(key, packed)
        for name, value in state.as_dict(packed=True).items():
            writer.add(f"{key}.{name}", value)
    writer.finish()
    for p in Path(base_dir).iterdir():
        if p.is_file() and p.name != "config.json" and not any(p.match(g) for g in WEIGHT_FILES):
            shutil.copy2(p, out_dir / p.name)
    config.quantization_config = bnb_config(nf4).to_dict()
    config.save_pretrained(out_dir)
    return len(source.quantized)
