"""Weights made once for greedy decoding, where memory allows.

The drift stage holds every model compactly and makes each layer's float32 weight when the layer runs:
4-bit codes dequantized (the reference), integer levels times scales (GPTQ and RTN rows), 16-bit
weights upcast (a merged checkpoint). A scoring forward runs each layer once per batch, so that is
cheap; greedy decoding runs every layer once per new token, and made the weights again at every step
(233 s of a 527 s drift stage on the demo's profile). Inside `made_once` each such layer computes
with a float32 weight made once, when the copies fit in `budget` bytes (room the memory plan adds to
the drift stage when it fits: Plan.decode_budget), and exactly as before otherwise. The products are
those of the same weight, so the completions are bit-identical either way; a weight the layer would
upcast a block of rows at a time (a vocabulary-sized head: models.float32) is left to do so, as its
blocks' products could round otherwise.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import torch

from qmerge.models.base import as_trained_forward, held_weight
from qmerge.models.float32 import UPCAST_ELEMENTS, _Float32Linear


def weight_maker(module: torch.nn.Module) -> Callable[[], torch.Tensor] | None:
    """How `module` makes its float32 weight at each forward (None: it holds it, or runs otherwise)."""
    if hasattr(module, "_old_forward"):  # accelerate's hook (a spread or streamed model) owns its forward
        return None
    if hasattr(module, "float_weight"):  # quant.rtn.RoundedLinear: levels × scales
        return module.float_weight
    if type(module) is _Float32Linear and module.weight.dtype != torch.float32 and module.weight.numel() <= UPCAST_ELEMENTS:
        return lambda: module.weight.float()
    if getattr(module.forward, "__func__", None) is as_trained_forward and module.compute_dtype == torch.float32:
        return lambda: held_weight(module).float()
    return None


@contextlib.contextmanager
def made_once(model: torch.nn.Module, budget: int) -> Iterator[bool]:
    """Every layer that makes its weight per forward computes with one made now, if all of them fit
    in `budget` bytes; yields whether they did. The layers are as they were afterwards."""
    makers = {m: f for m in model.modules() if (f := weight_maker(m)) is not None}
    need = sum(4 * m.out_features * m.in_features if hasattr(m, "out_features") else 4 * m.levels.numel() for m in makers)
    if not makers or need > budget:
        yield False
        return
    own = {m: m.__dict__.get("forward") for m in makers}  # a forward set on the instance (load_base's)
    try:
        for module, make in makers.items():
            module.forward = types.MethodType(_with_weight(make()), module)
        yield True
    finally:
        for module, forward in own.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _with_weight(weight: torch.Tensor):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(x.float(), weight, bias).to(x.dtype)

    return forward
