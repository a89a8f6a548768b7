"""The base model the adapter was trained on, loaded for computation: in 4-bit by bitsandbytes as the
training run loaded it (or as a pre-quantized checkpoint stores it), computing in float32 with the
weights bitsandbytes' forward computes with in training (the 4-bit values rounded to the training
compute dtype, qmerge.merge.nf4.as_computed), upcast exactly; or the 16-bit base for a plain LoRA."""

from __future__ import annotations

import types
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig

from qmerge.io.dtypes import dtype_name, torch_dtype
from qmerge.io.memory import release
from qmerge.merge.nf4 import as_computed, bnb_config
from qmerge.merge.source import is_prequantized
from qmerge.models.float32 import float32_compute
from qmerge.models.loading import from_pretrained
from qmerge.models.placement import Placement, as_placement, load_kwargs
from qmerge.settings import NF4Settings


def load_base(base_dir: Path, nf4: NF4Settings | None, device: torch.device | Placement, kind: str = "qlora", trust_remote_code: bool = False):
    """The base model the adapter was trained on, computing in float32 with the weights as trained:
    kind="qlora" loaded in 4-bit by bitsandbytes (a 16-bit base quantized with the training settings
    `nf4`, a pre-quantized checkpoint as stored), each 4-bit layer computing with its 4-bit values
    rounded to the training compute dtype `nf4.compute_dtype` (what bitsandbytes' forward multiplies
    by in training); kind="lora" the base as stored (the 16-bit weights; a pre-quantized checkpoint
    has no others), held in their stored dtype and upcast per use. On one device, or spread over
    several GPUs (a Placement with max_memory); never streamed."""
    import bitsandbytes as bnb

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    place = load_kwargs(replace(as_placement(device), stream=None), config, trust_remote_code)
    if kind == "lora" and not is_prequantized(config):  # held as stored, computing in float32: bit-identical, half the memory
        return float32_compute(from_pretrained(base_dir, "the base", dtype="auto", trust_remote_code=trust_remote_code, **place))
    # quantization_config only when bitsandbytes is to quantize (None would drop a checkpoint's own)
    quantize = {"quantization_config": bnb_config(nf4, compute_dtype="float32")} if kind == "qlora" and not is_prequantized(config) else {}
    model = from_pretrained(base_dir, "the base", dtype=torch.float32, trust_remote_code=trust_remote_code, **place, **quantize)
    trained = torch_dtype(nf4.compute_dtype) if nf4 is not None else torch.float32
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # the stored state dequantizes exactly; as_trained_forward rounds to the training compute dtype
            module.compute_dtype = torch.float32
            module.weight.quant_state.dtype = torch.float32
            module.trained_dtype = trained
            module.forward = types.MethodType(as_trained_forward, module)
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight at the first forward and then
            # computes in bf16 whatever compute_dtype says; keep the float32 path the metrics assume.
            module.support_avx512bf16_for_cpu = False
    for param in model.parameters():  # transformers keeps a pre-quantized checkpoint's other tensors in their stored dtype
        if param.is_floating_point() and param.dtype != torch.float32 and not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.float()
    release()  # the float copies bitsandbytes quantized from
    return model


def as_trained_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A load_base Linear4bit's forward: float32 arithmetic on the weight as trained (held_weight); in
    any other compute dtype (the noise floor sets the training one), bitsandbytes' own forward."""
    if self.compute_dtype != torch.float32:
        return type(self).forward(self, x)
    bias = None if self.bias is None else self.bias.float()
    return torch.nn.functional.linear(x.float(), held_weight(self).float(), bias).to(x.dtype)


def held_weight(module) -> torch.Tensor:
    """The weight a bitsandbytes Linear4bit of a load_base model computed with in training: its codes
    and statistics dequantized exactly, rounded to the training compute dtype (module.trained_dtype,
    set by load_base; float32 when unset), in that dtype.

    load_base turns bitsandbytes' CPU repacking off: the repack rounds the block scales to bf16, and
    bitsandbytes 0.50's inverse of it leaves non-nested scales transposed, so a repacked layer no
    longer holds the weights the adapter was trained against."""
    import bitsandbytes.functional as F

    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        raise RuntimeError("held_weight of a Linear4bit that bitsandbytes repacked for CPU inference; load it with qmerge.models.base.load_base")
    exact = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    return as_computed(exact, dtype_name(getattr(module, "trained_dtype", torch.float32)))


@torch.no_grad()
def dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """Every bitsandbytes Linear4bit of a load_base model replaced by a float32 nn.Linear holding its
    weight as trained (held_weight): the same function as its forward, without dequantizing at every
    forward (several times faster on CPU), and a float model PEFT merges in float."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = held_weight(module).float()
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=weight.device)
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias.float())
            model.set_submodule(name, linear)
    return model

