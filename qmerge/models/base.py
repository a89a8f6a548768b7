"""The base model the adapter was trained on, loaded for computation: in 4-bit by bitsandbytes as the
training run loaded it (or as a pre-quantized checkpoint stores it), computing in float32 with the
exact 4-bit values; or the 16-bit base for a plain LoRA."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qmerge.io.memory import release
from qmerge.merge.nf4 import bnb_config
from qmerge.merge.source import is_prequantized
from qmerge.models.float32 import float32_compute
from qmerge.models.placement import Placement, as_placement, load_kwargs
from qmerge.settings import NF4Settings


def load_base(base_dir: Path, nf4: NF4Settings | None, device: torch.device | Placement, kind: str = "qlora", trust_remote_code: bool = False):
    """The base model the adapter was trained on, computing in float32 with the exact 4-bit values:
    kind="qlora" loaded in 4-bit by bitsandbytes (a 16-bit base quantized with the training settings
    `nf4`, a pre-quantized checkpoint as stored), kind="lora" the base as stored (the 16-bit weights;
    a pre-quantized checkpoint has no others), held in their stored dtype and upcast per use. On one
    device, or spread over several GPUs (a Placement with max_memory); never streamed."""
    import bitsandbytes as bnb

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    place = load_kwargs(replace(as_placement(device), stream=None), config, trust_remote_code)
    if kind == "lora" and not is_prequantized(config):  # held as stored, computing in float32: bit-identical, half the memory
        return float32_compute(AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto", trust_remote_code=trust_remote_code, **place))
    # quantization_config only when bitsandbytes is to quantize (None would drop a checkpoint's own)
    quantize = {"quantization_config": bnb_config(nf4, compute_dtype="float32")} if kind == "qlora" and not is_prequantized(config) else {}
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, trust_remote_code=trust_remote_code, **place, **quantize)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # a pre-quantized checkpoint's config sets its own compute dtype, and its stored state
            # dequantizes to the dtype it was saved from (bf16 rounds the exact 4-bit values)
            module.compute_dtype = torch.float32
            module.weight.quant_state.dtype = torch.float32
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight at the first forward and then
            # computes in bf16 whatever compute_dtype says; keep the float32 path the metrics assume.
            module.support_avx512bf16_for_cpu = False
    for param in model.parameters():  # transformers keeps a pre-quantized checkpoint's other tensors in their stored dtype
        if param.is_floating_point() and param.dtype != torch.float32 and not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.float()
    release()  # the float copies bitsandbytes quantized from
    return model


def held_weight(module) -> torch.Tensor:
    """What a bitsandbytes Linear4bit of a load_base model holds, dequantized with its own state.

    load_base turns bitsandbytes' CPU repacking off: the repack rounds the block scales to bf16, and
    bitsandbytes 0.50's inverse of it leaves non-nested scales transposed, so a repacked layer no
    longer holds the weights the adapter was trained against."""
    import bitsandbytes.functional as F

    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        raise RuntimeError("held_weight of a Linear4bit that bitsandbytes repacked for CPU inference; load it with qmerge.models.base.load_base")
    return F.dequantize_4bit(module.weight.data, module.weight.quant_state)


@torch.no_grad()
def dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """Every bitsandbytes Linear4bit of a load_base model replaced by a float32 nn.Linear holding its
    dequantized weight: the same function as bitsandbytes' float32 path, without dequantizing at every
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


def set_4bit_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The dtype every bitsandbytes 4-bit layer computes in (the noise floor runs the reference in the
    training compute dtype)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype
