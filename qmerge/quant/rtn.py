"""Round-to-nearest: the GPTQ checkpoint's format without GPTQ's error compensation.

Each group of `group_size` input columns gets its scale and zero point from GPTQModel's own
Quantizer (the grid GPTQ uses, same bits, group size and sym), and each weight is rounded to the
nearest level on its own. The result is the value a GPTQ v1 checkpoint of those codes holds: levels
times the scale stored in float16. GPTQ-vs-RTN therefore isolates what GPTQ's Hessian-based updates buy.
"""

from __future__ import annotations

import functools
import types

import torch

from qmerge.io.memory import trim
from qmerge.models.architecture import linear_layers
from qmerge.models.engine import gptqmodel
from qmerge.quant.gptq_weights import weight_of
from qmerge.settings import GPTQSettings


@functools.cache
def quantizer(bits: int, group_size: int, sym: bool):
    """GPTQModel's Quantizer configured as its GPTQ processor configures it (per channel, no MSE
    search): each row of what it is given is one group. Built once per grid (a QuantizeConfig is
    not cheap to build)."""
    gptqmodel()
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.quantizer import Quantizer

    q = Quantizer(QuantizeConfig(bits=bits, group_size=group_size, sym=sym, format="gptq"))
    q.configure(perchannel=True)
    return q


def levels_and_scales(weight: torch.Tensor, gptq: GPTQSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The (out, in) weight rounded group by group to the GPTQ grid: integer levels (q − zero)
    and each group's scale as the checkpoint stores it (float16), shape (out, groups). Every group
    of every row at once, as rows of an (out·groups, group_size) matrix: the Quantizer's grid is
    per row, so this is the same arithmetic as one group at a time, in one call per layer."""
    q = quantizer(gptq.bits, gptq.group_size, gptq.sym)
    out, columns = weight.shape
    step = columns if gptq.group_size == -1 else gptq.group_size
    rows = weight.detach().float().reshape(out * (columns // step), step)
    q.find_params(rows, weight=True)
    levels = torch.round(q.quantize(rows) / q.scale).to(torch.int8 if gptq.bits < 8 else torch.int16)  # integer q − zero, exactly; 8-bit asymmetric reaches ±255
    return levels.reshape(out, columns), q.scale.half().reshape(out, columns // step)


def fake_quantize(weight: torch.Tensor, gptq: GPTQSettings) -> torch.Tensor:
    """The (out, in) weight rounded group by group to the GPTQ grid, as float32: levels times the
    float16 scale (more bits than a 16-bit weight has)."""
    return weight_of(*levels_and_scales(weight, gptq))


class RoundedLinear(torch.nn.Module):
    """A linear layer held as integer levels (q − zero) and float16 group scales, the weight made in
    float32 when the layer runs (levels × scale: exact in float32, more bits than a 16-bit weight
    has): a quarter of a float32 copy's memory, the same products. RTN's layers, and a GPTQ
    checkpoint's as stored (qmerge.quant.gptq_float), whose act-order groups `g_idx` maps."""

    def __init__(self, levels: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, g_idx: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("levels", levels)
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", None if g_idx is None or _contiguous(g_idx, scales.shape[1]) else g_idx)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def rounded(cls, weight: torch.Tensor, bias: torch.Tensor | None, gptq: GPTQSettings) -> "RoundedLinear":
        """`weight` rounded to the nearest level of the GPTQ grid (RTN)."""
        return cls(*levels_and_scales(weight, gptq), bias)

    def float_weight(self) -> torch.Tensor:
        return weight_of(self.levels, self.scales, self.g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.float_weight(), self.bias)


def _contiguous(g_idx: torch.Tensor, groups: int) -> bool:
    """Whether input column i is in group i // (columns / groups), as without act-order."""
    return g_idx.numel() % groups == 0 and torch.equal(g_idx.long(), torch.arange(g_idx.numel(), device=g_idx.device) // (g_idx.numel() // groups))


class _RoundedWhenRun(torch.nn.Linear):
    """A streamed linear layer (its weight brought in as it runs) rounded to the GPTQ grid each time it
    runs: nothing held between runs, the products of RoundedLinear."""

    gptq: GPTQSettings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, fake_quantize(self.weight, self.gptq), None if self.bias is None else self.bias.float())


@torch.no_grad()
def apply(model: torch.nn.Module, names: set[str], gptq: GPTQSettings, streamed: bool = False) -> torch.nn.Module:
    """The linear layers `names` (the layers GPTQ quantizes, as the checkpoint names them: fused MoE
    experts become per-expert layers first) replaced by their round-to-nearest on the GPTQ grid, held
    as levels and scales; in a streamed model (models.placement) rounded as each runs."""
    linears = linear_layers(model, names)
    for i, name in enumerate(sorted(linears)):
        if i % 16 == 15:
            trim()  # each layer's float32 temporaries, before they fragment the heap
        linear = linears[name]
        if streamed:
            linear.__class__ = _RoundedWhenRun
            linear.gptq = gptq
            if hasattr(linear, "_old_forward"):  # accelerate's hook calls the forward it found at load
                linear._old_forward = types.MethodType(_RoundedWhenRun.forward, linear)
        else:
            model.set_submodule(name, RoundedLinear.rounded(linear.weight, linear.bias, gptq))
    return model
