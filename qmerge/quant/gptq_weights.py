"""The weights a GPTQ v1 checkpoint (format gptq, int32 packing) stores, as float32, read from its
tensors rather than through a kernel: every kernel computes with these values in its own precision
(Marlin in float16), so scoring them in float32 measures the checkpoint, not the arithmetic.

Per layer: qweight (in·bits/32, out) and qzeros (groups, out·bits/32) hold codes packed
little-endian into int32 words (3-bit codes straddle word boundaries), scales (groups, out) are
float16, g_idx (in) maps each input row to its group; v1 stores each zero point minus one. The
weight is scale · (code − zero), exact in float32 (a float16 scale times a small integer), the same
value qmerge.quant.rtn writes for round-to-nearest.
"""

from __future__ import annotations

import torch

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes of `bits` bits packed along dim 0 of an int32 tensor, (count, cols).

    2, 4 and 8 bits fill whole words: each word's codes come out by one shift per position, in int32
    (whatever an arithmetic shift brings in above a code is masked off). 3 bits straddle words: the
    general path reads each code from the pair of words it may span, in int64 (several times slower;
    the check and every load of a 4-bit checkpoint take the first path)."""
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        codes = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # (words, codes per word, cols)
        return codes.reshape(-1, packed.shape[1])[:count]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros_like(words[:1])])  # a code may end in the word after
    start = torch.arange(count, device=packed.device) * bits
    index, offset = start // 32, start % 32
    both = words[index] | (words[index + 1] << 32)  # the low bits a code can span are unaffected by the sign
    return (both >> offset[:, None]) & ((1 << bits) - 1)


def dequantize(tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """The (out, in) float32 weight of one GPTQ v1 layer from its qweight, qzeros, scales and g_idx."""
    return weight_of(*stored_levels(tensors, bits))


def weight_of(levels: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """levels × scale as float32 (int × float32 promotes exactly, in one product): by broadcasting
    over contiguous groups, or through `g_idx` (each input column's group: act-order). It runs at
    every forward of a layer held as levels (qmerge.quant.rtn.RoundedLinear), decoding steps included."""
    scales = scales.float()
    if g_idx is not None:
        return levels * scales[:, g_idx]
    rows, cols = levels.shape
    return (levels.view(rows, scales.shape[1], -1) * scales[:, :, None]).view(rows, cols)


def stored_levels(tensors: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One GPTQ v1 layer as (levels, scales, g_idx): the integers code − zero, (out, in), in int8
    (int16 at 8 bits, whose levels reach ±256); the float16 scales, (out, groups); each input
    column's group. The weight is levels × scales[:, g_idx]."""
    scales, g_idx = tensors["scales"], tensors["g_idx"].long()
    codes = unpack(tensors["qweight"], bits, g_idx.numel())  # (in, out)
    zeros = unpack(tensors["qzeros"].T, bits, scales.shape[1]).T + 1  # (groups, out); v1 stores zero − 1
    levels = (codes - zeros[g_idx]).T.to(torch.int8 if bits < 8 else torch.int16).contiguous()
    return levels, scales.T.contiguous(), g_idx


def layer_tensors(checkpoint, name: str) -> dict[str, torch.Tensor]:
    """One quantized layer's tensors from a LazyCheckpoint of a GPTQ checkpoint."""
    tensors = checkpoint.get_many([f"{name}.{s}" for s in SUFFIXES])
    return {s: tensors[f"{name}.{s}"] for s in SUFFIXES}
