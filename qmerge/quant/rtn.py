"""Round-to-nearest: the GPTQ checkpoint's format without GPTQ's error compensation.

Each group of `group_size` input columns gets its scale and zero point from GPTQModel's own
Quantizer (the grid GPTQ uses, same bits, group size and sym), and each weight is rounded to the
nearest level on its own. The result is the value a GPTQ v1 checkpoint of those codes holds: levels
times the scale stored in float16. GPTQ-vs-RTN therefore isolates what GPTQ's Hessian-based updates buy.
"""

from __future__ import annotations

import torch

from qmerge.models.architecture import linear_layers
from qmerge.models.engine import gptqmodel
from qmerge.settings import GPTQSettings


def quantizer(gptq: GPTQSettings):
    """GPTQModel's Quantizer configured as its GPTQ processor configures it (per channel, no MSE search)."""
    gptqmodel()
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.quantizer import Quantizer

    q = Quantizer(QuantizeConfig(bits=gptq.bits, group_size=gptq.group_size, sym=gptq.sym, desc_act=gptq.desc_act, format="gptq"))
    q.configure(perchannel=True)
    return q


def fake_quantize(weight: torch.Tensor, gptq: GPTQSettings) -> torch.Tensor:
    """The (out, in) weight rounded group by group to the GPTQ grid, as float32."""
    q = quantizer(gptq)
    w = weight.detach().float()
    out = torch.empty_like(w)
    step = w.shape[1] if gptq.group_size == -1 else gptq.group_size
    for start in range(0, w.shape[1], step):
        group = w[:, start : start + step]
        q.find_params(group, weight=True)
        levels = torch.round(q.quantize(group) / q.scale)  # integer q − zero, exactly
        out[:, start : start + step] = levels * q.scale.half().float()
    return out


@torch.no_grad()
def apply(model: torch.nn.Module, names: set[str], gptq: GPTQSettings) -> torch.nn.Module:
    """Round the weights of the linear layers `names` (the layers GPTQ quantizes, as the checkpoint
    names them: fused MoE experts become per-expert layers first), held in float32: levels times a
    float16 scale need more bits than a 16-bit weight has."""
    for linear in linear_layers(model, names).values():
        linear.weight = torch.nn.Parameter(fake_quantize(linear.weight, gptq), requires_grad=False)
    return model
