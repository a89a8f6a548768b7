"""bitsandbytes 0.50's 4-bit quantization on the CPU, reproduced bit for bit in vectorised torch.

Why: on a CPU bitsandbytes quantizes with its pure-torch default backend, whose `torch.bucketize`
looks each weight up by a scalar binary search (~10M weights/s on 2 cores: most of the merge stage).
Here the same function is computed from a fine grid: a weight's scaled value x (|x| ≤ 1) falls in
one of 2·4096 + 1 cells by an exactly rounded `x·4096 + M` (M: a float whose spacing is 1, so the
sum's bits are the cell number), and each cell holds at most one decision boundary, so the code is
that cell's count of boundaries below it plus one comparison with its own boundary.

Arithmetic reproduced (bitsandbytes/backends/default/ops.py quantize_4bit, cpu/ops.py and
csrc/cpu_ops.cpp for the rest):
- blocks of `blocksize` consecutive weights in row-major order, the last one possibly partial;
  absmax per block; x = w · (1 / max(absmax, 1e-38)) for whole blocks, w / max(absmax, 1e-38) for the
  partial one (whose stored absmax is the clamped one); code = #{midpoints of the sorted code table
  < x} (ties go to the lower code), FP4 mapped back through the table's sort order;
- double quantization: offset = mean(absmax), absmax − offset quantized in blocks of 256 on the
  8-bit dynamic map as bitsandbytes' CPU kernel does it (a 65,536-entry table indexed by
  (x + 1)·0.5·65535 + 0.5);
- dequantization: code value · block scale in float32 (scale = dynamic value · absmax2 + offset when
  nested), rounded once to the output dtype.

Flat blocks, as bitsandbytes' CUDA and default kernels read them. bitsandbytes 0.50.2's CPU
`dequantize_4bit` on AVX-512 machines indexes the scales per row instead, which differs when a row is
not a whole number of blocks (tests/test_nf4_cpu.py shows it); qmerge.merge.nf4 leaves such weights
to bitsandbytes, so that the merge, verify and the reference agree on every CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, wraps

import torch

GRID = 4096  # cells per unit of x
_MAGIC = 1.5 * 2.0**23  # x·GRID + _MAGIC rounds x·GRID to an integer held in the low mantissa bits
_MAGIC_BITS = 0x4B400000  # the int32 bits of _MAGIC
NESTED_BLOCK = 256  # bitsandbytes' blocksize for the double quantization of absmax
CHUNK = 1 << 18  # weights per step: the temporaries of one step stay in the CPU's cache


class NonFinite(ValueError):
    """A block holds NaN or Inf: bitsandbytes' result there is whatever its kernels do with them."""


@dataclass(frozen=True)
class Nested:
    """Double quantization of the block absmax: 8-bit codes, per-256 absmax and the offset."""

    codes: torch.Tensor  # uint8, one per 4-bit block
    absmax: torch.Tensor  # float32, one per 256 codes
    offset: torch.Tensor  # float32 scalar: the mean of the absmax it was taken from


@dataclass(frozen=True)
class Quantized:
    """What bitsandbytes' quantize_4bit returns, the 4-bit codes kept one per byte."""

    codes: torch.Tensor  # uint8, one per weight, flat
    absmax: torch.Tensor  # float32 per block (with double quantization: bitsandbytes keeps nested.codes instead)
    shape: torch.Size
    dtype: torch.dtype  # of the input: bitsandbytes dequantizes to it by default
    blocksize: int
    quant_type: str
    nested: Nested | None = None

    def packed(self, storage: torch.dtype = torch.uint8) -> torch.Tensor:
        """bitsandbytes' packed tensor: two codes per byte, the first in the high nibble, as a
        ((n + 1) // 2, 1) column viewed in the storage dtype."""
        # an odd count is padded with the code of 0.0, as bitsandbytes pads the scaled values
        codes = self.codes if self.codes.numel() % 2 == 0 else torch.cat([self.codes, _codes(torch.zeros(1), self.quant_type)])
        packed = ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)
        return packed if storage == torch.uint8 else packed.squeeze().view(storage).unsqueeze(1)

    def scales(self) -> torch.Tensor:
        """The float32 scale of each block as dequantization uses it (double quantization undone)."""
        if self.nested is None:
            return self.absmax
        values = torch.index_select(dynamic_map(), 0, self.nested.codes.int())
        blocks = _blocks(values, NESTED_BLOCK)
        scaled = torch.cat([(b * a[:, None]).view(-1) for b, a in zip(blocks, self.nested.absmax.split([len(b) for b in blocks]))])
        return scaled + self.nested.offset


def _single_threaded(function):
    """Run on one intra-op thread. The many short steps each end in a thread barrier: on a loaded
    2-core machine (the shared VM of BENCHMARKS.md) two threads ran the round trip 5-20× slower than
    one, and one thread already does ~10× bitsandbytes' two."""

    @wraps(function)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@_single_threaded
def quantize(weight: torch.Tensor, blocksize: int, quant_type: str = "nf4", double_quant: bool = False) -> Quantized:
    """bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics=double_quant,
    quant_type=quant_type) on the CPU, bit for bit; raises NonFinite for NaN or Inf weights."""
    flat = weight.detach().reshape(-1)
    full = flat.numel() // blocksize * blocksize
    absmax = _block_absmax(flat[:full], blocksize)
    if full < flat.numel():  # a partial last block: its absmax is stored clamped, and divides
        absmax = torch.cat([absmax, flat[full:].float().abs().amax(0, keepdim=True).clamp(min=1e-38)])
    if not torch.isfinite(absmax).all():
        raise NonFinite("NaN or Inf among the weights")
    codes = torch.empty(flat.numel(), dtype=torch.uint8)
    reciprocal = 1.0 / absmax[: full // blocksize].clamp(min=1e-38)
    step = max(1, CHUNK // blocksize) * blocksize
    for start in range(0, full, step):
        end = min(start + step, full)
        x = flat[start:end].float().view(-1, blocksize) * reciprocal[start // blocksize : end // blocksize, None]
        codes[start:end] = _codes(x.view(-1), quant_type)
    if full < flat.numel():
        codes[full:] = _codes(torch.clamp(flat[full:].float() / absmax[-1], -1, 1), quant_type)
    nested = _double_quantize(absmax) if double_quant else None
    return Quantized(codes, absmax, weight.shape, weight.dtype, blocksize, quant_type, nested)


@_single_threaded
def dequantize(q: Quantized, dtype: torch.dtype | None = None) -> torch.Tensor:
    """bitsandbytes.functional.dequantize_4bit of `q` in `dtype` (default: the input's), flat blocks."""
    values, scales = _code_table(q.quant_type)[0], q.scales()
    out = torch.empty(q.codes.numel(), dtype=dtype or q.dtype)
    full = q.codes.numel() // q.blocksize * q.blocksize
    step = max(1, CHUNK // q.blocksize) * q.blocksize
    for start in range(0, full, step):
        end = min(start + step, full)
        block = torch.index_select(values, 0, q.codes[start:end].int()).view(-1, q.blocksize) * scales[start // q.blocksize : end // q.blocksize, None]
        out[start:end] = block.view(-1)
    if full < q.codes.numel():
        out[full:] = torch.index_select(values, 0, q.codes[full:].int()) * scales[-1]
    return out.view(q.shape)


def _block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |w| of each whole block, in float32 (+0.0 for a block of zeros, as abs().max() gives)."""
    if flat.numel() == 0:
        return torch.empty(0)
    low, high = torch.aminmax(flat.view(-1, blocksize), dim=1)
    return torch.maximum(-low, high).float().abs()


def _codes(x: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The 4-bit code of each scaled value x (|x| ≤ 1 up to rounding): the count of decision
    boundaries below x, read from x's grid cell and one comparison with the cell's own boundary."""
    values, below, boundary, order = _code_table(quant_type)
    cell = torch.add(torch.tensor(_MAGIC), x, alpha=GRID).view(torch.int32).sub_(_MAGIC_BITS - GRID)
    sorted_code = torch.index_select(below, 0, cell).add_(x > torch.index_select(boundary, 0, cell))
    return (sorted_code if order is None else torch.index_select(order, 0, sorted_code)).to(torch.uint8)


@cache
def _code_table(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(code values, and per grid cell: boundaries wholly below it, its one boundary (2.0 if none),
    the sort order mapping back to codes or None when the table is sorted) of bitsandbytes' table."""
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type(quant_type, device="cpu")
    order = torch.argsort(code)  # as bitsandbytes' default backend sorts it (FP4 holds +0 and -0)
    midpoints = ((code[order[:-1]] + code[order[1:]]) / 2).double()
    # cell k holds the x with round(x·GRID) = k − GRID: x in [(k − GRID − ½)/GRID, (k − GRID + ½)/GRID]
    centre = (torch.arange(2 * GRID + 1, dtype=torch.float64) - GRID) / GRID
    low, high = centre - 0.5 / GRID, centre + 0.5 / GRID
    inside = (midpoints[None, :] >= low[:, None]) & (midpoints[None, :] <= high[:, None])
    assert int(inside.sum(1).max()) <= 1, "grid too coarse for this code table"
    below = (midpoints[None, :] < low[:, None]).sum(1).int()
    boundary = torch.where(inside.any(1), (midpoints[None, :] * inside).sum(1), torch.tensor(2.0)).float()
    identity = torch.equal(order, torch.arange(16))
    return code, below, boundary, None if identity else order.int()


def _double_quantize(absmax: torch.Tensor) -> Nested:
    """bitsandbytes' quantize_blockwise(absmax − mean(absmax), blocksize=256)."""
    offset = absmax.mean()
    codes, absmax2 = quantize_8bit(absmax - offset)
    return Nested(codes, absmax2, offset)


def quantize_8bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, float32 absmax per block) of bitsandbytes' CPU quantize_blockwise of float32
    `values` on its dynamic map in blocks of 256, bit for bit."""
    codes, absmax = [], []
    for part in _blocks(values, NESTED_BLOCK):
        peak = part.abs().amax(1, keepdim=True)
        scaled = (part * (1.0 / torch.where(peak == 0, 1.0, peak))).clamp(-1, 1)
        # (x + 1)·0.5·65535 + 0.5 rounded once (float64 holds it exactly), as a fused multiply-add does;
        # rounding the product first gives the same table entry at every one of the table's steps
        index = ((scaled + 1.0).double() * 32767.5 + 0.5).float().int()
        code = torch.index_select(_dynamic_lut(), 0, index.view(-1)).view(index.shape)
        codes.append(torch.where(peak == 0, 0, code).view(-1))  # a block of zeros gets code 0
        absmax.append(peak.view(-1))
    return torch.cat(codes).to(torch.uint8), torch.cat(absmax)


def _blocks(flat: torch.Tensor, size: int) -> list[torch.Tensor]:
    """`flat` as (blocks, size) for its whole blocks and (1, rest) for a partial last one."""
    full = flat.numel() // size * size
    return [b for b in (flat[:full].view(-1, size), flat[full:].view(1, -1)) if b.numel()]


@cache
def dynamic_map() -> torch.Tensor:
    from bitsandbytes.functional import create_dynamic_map

    return create_dynamic_map()


@cache
def _dynamic_lut() -> torch.Tensor:
    """bitsandbytes' CPU quantization table: entry i = the count of code midpoints below
    −1 + 2i/65535 (all in float32), the nearest code with ties going down."""
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + torch.arange(65536, dtype=torch.float32) * 2.0 / 65535.0
    return torch.searchsorted(midpoints, grid).int()
