"""Round-to-nearest: the GPTQ checkpoint's format without GPTQ's error compensation.

Each group of `group_size` input columns gets its scale and zero point from GPTQModel's own
Quantizer (the grid GPTQ uses, same bits, group size and sym), and each weight is rounded to the
nearest level on its own. The result is the value a GPTQ v1 checkpoint of those codes holds: levels
times the scale stored in float16. GPTQ-vs-RTN therefore isolates what GPTQ's Hessian-based updates buy.
"""

from __future__ import annotations

import types

import torch

from qmerge.io.memory import trim
from qmerge.models.architecture import linear_layers
from qmerge.models.engine import gptqmodel
from qmerge.quant.gptq_weights import weight_of
from qmerge.settings import GPTQSettings


def quantizer(gptq: GPTQSettings):
    """GPTQModel's Quantizer configured as its GPTQ processor configures it (per channel, no MSE search)."""
    gptqmodel()
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.quantizer import Quantizer

    q = Quantizer(QuantizeConfig(bits=gptq.bits, group_size=gptq.group_size, sym=gptq.sym, desc_act=gptq.desc_act, format="gptq"))
    q.configure(perchannel=True)
    return q


def levels_and_scales(weight: torch.Tensor, gptq: GPTQSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The (out, in) weight rounded group by group to the GPTQ grid: integer levels (q − zero)
    and each group's scale as the checkpoint stores it (float16), shape (out, groups)."""
    q = quantizer(gptq)
    w = weight.detach().float()
    step = w.shape[1] if gptq.group_size == -1 else gptq.group_size
    levels = torch.empty(w.shape, dtype=torch.int8 if gptq.bits < 8 else torch.int16, device=w.device)  # 8-bit asymmetric levels reach ±255
    scales = []
    for start in range(0, w.shape[1], step):
        group = w[:, start : start + step]
        q.find_params(group, weight=True)
        levels[:, start : start + step] = torch.round(q.quantize(group) / q.scale).to(torch.int8)  # integer q − zero, exactly
        scales.append(q.scale.half().reshape(-1, 1))
    return levels, torch.cat(scales, dim=1)


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
