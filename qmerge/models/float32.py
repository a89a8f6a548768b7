"""Float32 computation over weights held in 16 bits: every Linear upcasts its weight when it runs and
every Embedding the rows it looks up, both exact, so the logits are bit-identical to a float32 copy's
at half its memory."""

from __future__ import annotations

import types

import torch


UPCAST_ELEMENTS = 1 << 24  # a weight upcast whole up to this size (64 MB in float32), by blocks of rows beyond


class _Float32Linear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        if self.weight.numel() <= UPCAST_ELEMENTS or self.weight.dtype == torch.float32:
            return torch.nn.functional.linear(x, self.weight.float(), bias)
        # a vocabulary-sized head (128256 × 4096: a 2.1 GB float32 copy), an 8B model's MLP: the output a block
        # of rows at a time (the same products: each output is one row's dot product, whatever the block)
        rows = max(1, UPCAST_ELEMENTS // self.weight.shape[1])
        parts = [torch.nn.functional.linear(x, self.weight[r : r + rows].float(), None if bias is None else bias[r : r + rows]) for r in range(0, self.weight.shape[0], rows)]
        return torch.cat(parts, dim=-1)


def float32_weights(linear: torch.nn.Module) -> bool:
    """Whether `linear` computes as a float32 nn.Linear does: one (with float32 tensors), or one that
    upcasts its 16-bit weight per use (float32_compute), with no per-instance forward in the way."""
    if "forward" in linear.__dict__ or type(linear) not in (torch.nn.Linear, _Float32Linear):
        return False
    return type(linear) is _Float32Linear or linear.weight.dtype == torch.float32


def equal_upcast(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same values once upcast to float32, compared UPCAST_ELEMENTS at a
    time (a vocabulary-sized head whole in float32 would be a 2.1 GB temporary)."""
    if a.shape != b.shape or a.device != b.device:
        return False
    a, b = a.reshape(-1), b.reshape(-1)
    return all(torch.equal(a[i : i + UPCAST_ELEMENTS].float(), b[i : i + UPCAST_ELEMENTS].float()) for i in range(0, a.numel(), UPCAST_ELEMENTS))


class _Float32Embedding(torch.nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()  # rows looked up, then upcast: the same values as a float32 table


def float32_compute(model: torch.nn.Module) -> torch.nn.Module:
    """Compute in float32 while holding a 16-bit model's weights in 16 bits: every Linear upcasts its
    weight when it runs and every Embedding upcasts the rows it looks up, both exact, so the logits are
    bit-identical to a float32 copy's (tests/test_drift.py checks with torch.equal) at half its memory.
    The small tensors (norms, biases, buffers) become float32."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = _Float32Linear
        elif type(module) is torch.nn.Embedding:
            module.__class__ = _Float32Embedding
        if hasattr(module, "_old_forward"):  # accelerate's hook calls the forward it found at load: the new class's now
            module._old_forward = types.MethodType(type(module).forward, module)
        big = {"weight"} if isinstance(module, (_Float32Linear, _Float32Embedding)) else set()
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and name not in big:
                param.data = param.data.float()
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point():
                module._buffers[name] = buf.float()  # in place of the entry: persistence unchanged
    return model


@torch.no_grad()
def round_stored(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every parameter of a float32_compute model rounded to `dtype`, as a checkpoint of that dtype
    stores it: the weights it upcasts per use are held in `dtype`, the small tensors stay float32
    holding the rounded values."""
    upcasting = (_Float32Linear, _Float32Embedding)
    # a tensor tied to a module that does not upcast per use (Gemma's scaled embedding, tied to the
    # head) stays float32 for both, holding the rounded values
    float32 = {id(p) for m in model.modules() if not isinstance(m, upcasting) for p in m.parameters(recurse=False)}
    for module in model.modules():
        held = {"weight"} if isinstance(module, upcasting) else set()
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype) if name in held and id(param) not in float32 else param.data.to(dtype).float()
