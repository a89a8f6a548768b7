"""The GPTQ checkpoint in the layout of the model it came from. GPTQModel splits some fused linears
before quantizing them (defuser: Phi-3's gate_up_proj into gate_proj and up_proj) and saves the
parts; transformers' Phi-3 has no such modules, so it loaded that checkpoint with gate_up_proj left
random (and GPTQModel's kernel then indexed garbage). Each split layer is written back fused, as the
original checkpoint stores it: the parts' output columns concatenated in row order (qweight, qzeros,
scales, bias), their common g_idx kept.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from qmerge.errors import QmergeError
from qmerge.io.checkpoint import INDEX_NAME, LazyCheckpoint, ShardWriter

_OUTPUT_DIM = {"qweight": 1, "qzeros": 1, "scales": 1, "bias": 0}


def fuse(out_dir: Path, fused: dict[str, tuple[str, ...]], bits: int) -> None:
    """Rewrite the checkpoint in `out_dir` with every layer of `fused` (fused name → parts in row
    order) stored fused; a no-op when there is none."""
    if not fused:
        return
    ckpt = LazyCheckpoint.open(out_dir)
    owner = {f"{part}.": whole for whole, parts in fused.items() for part in parts}
    new = out_dir / ".fused"
    writer = ShardWriter(new)
    for key in ckpt.keys():
        if not any(key.startswith(prefix) for prefix in owner):
            writer.add(key, ckpt.get(key))
    for whole, parts in fused.items():
        for suffix, tensor in _fused_tensors(ckpt, whole, parts, bits).items():
            writer.add(f"{whole}.{suffix}", tensor)
    written = writer.finish()
    for old in [*out_dir.glob("*.safetensors"), out_dir / INDEX_NAME]:
        old.unlink(missing_ok=True)
    for path in [*written, new / INDEX_NAME]:
        if path.exists():
            os.replace(path, out_dir / path.name)
    shutil.rmtree(new)


def _fused_tensors(ckpt: LazyCheckpoint, whole: str, parts: tuple[str, ...], bits: int) -> dict[str, torch.Tensor]:
    keys = set(ckpt.keys())
    g_idx = [ckpt.get(f"{p}.g_idx") for p in parts]
    if any(not torch.equal(g, g_idx[0]) for g in g_idx):
        raise QmergeError(f"GPTQ gave the parts of {whole} different group orders (act-order); they cannot be stored fused: rerun without --act-order")
    out = {"g_idx": g_idx[0]}
    for suffix, dim in _OUTPUT_DIM.items():
        present = [f"{p}.{suffix}" in keys for p in parts]
        if not any(present):
            continue
        tensors = [ckpt.get(f"{p}.{suffix}") for p in parts]
        if suffix == "qzeros" and any(t.shape[1] * 32 != (ckpt.get(f"{p}.scales").shape[1] * bits) for t, p in zip(tensors, parts)):
            raise QmergeError(f"{whole}: a part's output width does not fill whole int32 words of {bits}-bit zero points; use --bits 4 or 8")
        out[suffix] = torch.cat(tensors, dim=dim)
    return out
