"""Which 16-bit arithmetic this machine does natively, decided in one place, and the float32
emulation of it used where it does not.

Without native bf16 (or fp16) matrix instructions a CPU runs 16-bit matrix products in generic
kernels: on an AVX2-only CPU a bf16 linear layer is several times slower than a float32 one, and a
QLoRA training step or a 4-bit forward in bf16 takes minutes. The decision is by capability, not by
vendor (x86 and aarch64 alike): torch's oneDNN reports whether the CPU has the instructions, which
also honours ONEDNN_MAX_CPU_ISA (with ATEN_CPU_CAPABILITY=avx2, the way to mimic an AVX2-only CPU on
any machine); QMERGE_EMULATE_BF16=1 forces the non-native path. bitsandbytes' own probe
(has_avx512bf16) reads cpuid and ignores both variables.

Where 16-bit arithmetic is not native, a bitsandbytes 4-bit layer "computing in bf16" is emulated in
float32 with bf16's roundings: input, weight and bias rounded to bf16, products summed in float32 (as
bf16 GEMM kernels accumulate), the output rounded to bf16 and returned in the input's dtype, as
bitsandbytes' Linear4bit returns it. Only the order of the float32 sums differs from a real bf16
kernel (tests/test_precision.py measures how little that moves the noise floor).
"""

from __future__ import annotations

import contextlib
import os

import torch

EMULATE_ENV = "QMERGE_EMULATE_BF16"


def native(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `device` does matrix products in `dtype` with native instructions."""
    if dtype == torch.float32:
        return True
    if os.environ.get(EMULATE_ENV, "") not in ("", "0"):
        return False
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
        return bool(probe and getattr(torch.ops.mkldnn, probe)())
    return False


def training_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype of a QLoRA fine-tune on `device`: bf16 (the QLoRA recipe's) where native,
    float32 otherwise (an equally valid QLoRA adapter: the 4-bit base is the same)."""
    return torch.bfloat16 if native(torch.bfloat16, device) else torch.float32


def describe(dtype: torch.dtype, device: torch.device) -> str:
    """How a 4-bit layer computing in `dtype` runs on `device`: "native" or "emulated"."""
    return "native" if native(dtype, device) else "emulated"


@contextlib.contextmanager
def computing_in(model: torch.nn.Module, dtype: torch.dtype):
    """Every bitsandbytes 4-bit layer of `model` computing in `dtype` for the duration, natively
    (bitsandbytes' compute_dtype) or emulated in float32; afterwards in float32 again, biases as
    they were (bitsandbytes casts a bias to the compute dtype in place, which left a float32
    reference with bf16-rounded biases after a bf16 forward)."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    device = next(model.parameters()).device
    emulate = not native(dtype, device)
    biases = {m: m.bias.data for m in layers if m.bias is not None}
    forwards = {m: m.__dict__.get("forward") for m in layers}  # load_base's as-trained forward, restored after
    for m in layers:
        if emulate:
            m.forward = _emulated_forward(m, dtype)
        else:
            m.compute_dtype = dtype
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
            if forwards[m] is not None:
                m.forward = forwards[m]
            m.compute_dtype = torch.float32
        for m, data in biases.items():
            m.bias.data = data


def _emulated_forward(module, dtype: torch.dtype):
    """bitsandbytes' Linear4bit.forward in `dtype`, computed in float32 with `dtype`'s roundings."""
    from qmerge.models.base import held_weight

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = held_weight(module).to(dtype).float()
        bias = None if module.bias is None else module.bias.to(dtype).float()
        return torch.nn.functional.linear(x.to(dtype).float(), weight, bias).to(dtype).to(x.dtype)

    return forward
