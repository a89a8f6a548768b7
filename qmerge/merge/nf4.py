"""bitsandbytes' 4-bit quantization as a training run's load applied it: which linear layers it
quantized, with which settings, and the round trip dequantize(quantize_4bit(W)) of one weight.

QLoRA trains against dequantize(quantize_nf4(W)), not W. bitsandbytes packs the same 4-bit codes
whatever the input dtype (bf16 or its exact float32 upcast), so the round trip quantizes in float32
and dequantizes to the exact values code × absmax. Its forward (`matmul_4bit`, every training step)
does not multiply by those: bitsandbytes 0.50's gemm_4bit dequantizes into the dtype of the
activations, the training compute dtype, so a bf16 run computes with code × absmax rounded to bf16
(tests/test_nf4_properties.py checks it against matmul_4bit itself). `round_trip` returns those
values, the ones the adapter was trained against.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from qmerge.io.dtypes import torch_dtype
from qmerge.merge import nf4_cpu
from qmerge.settings import NF4Settings


def bnb_config(nf4: NF4Settings, compute_dtype: str | None = None) -> BitsAndBytesConfig:
    """The BitsAndBytesConfig of the training run (compute dtype overridable for evaluation)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=nf4.quant_type,
        bnb_4bit_use_double_quant=nf4.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype or nf4.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(nf4.quant_storage),
        llm_int8_skip_modules=list(nf4.skip_modules) or None,
    )


def quantized_linear_names(config: AutoConfig, nf4: NF4Settings, trust_remote_code: bool = False) -> set[str]:
    """Module names transformers turns into bnb Linear4bit at load, decided by transformers itself
    (its quantizer's modules_to_not_convert: lm_head, tied/output embeddings, _keep_in_fp32_modules,
    the user's skip list) on a weightless model, so qmerge and the training run agree by construction."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    quantizer = Bnb4BitHfQuantizer(bnb_config(nf4))
    skip = quantizer.get_modules_to_not_convert(model, quantizer.quantization_config.llm_int8_skip_modules, model._keep_in_fp32_modules)
    model = replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=quantizer.quantization_config)
    return {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def round_trip(weight: torch.Tensor, nf4: NF4Settings, device: torch.device) -> torch.Tensor:
    """The weight bitsandbytes' forward multiplies by after quantize_4bit(W) with the training settings:
    the exact 4-bit values rounded once to the training compute dtype, in that dtype, on `device`."""
    return as_computed(exact_round_trip(weight, nf4, device), nf4.compute_dtype)


def as_computed(exact: torch.Tensor, compute_dtype: str) -> torch.Tensor:
    """Exact 4-bit values (code × absmax, float32) as bitsandbytes' forward computes with them: rounded
    to the compute dtype, as its gemm_4bit dequantizes (one rounding, float32 → compute dtype)."""
    return exact.to(torch_dtype(compute_dtype))


def exact_round_trip(weight: torch.Tensor, nf4: NF4Settings, device: torch.device) -> torch.Tensor:
    """dequantize(quantize_4bit(W)), exact (code × absmax), as float32 on `device`: bitsandbytes' own
    kernels on a GPU, its CPU arithmetic reproduced bit for bit on the CPU (qmerge.merge.nf4_cpu, ~10×
    faster). A weight whose rows are not whole blocks stays with bitsandbytes: its CPU kernel on
    AVX-512 reads the scales of such rows per row rather than per flat block, and the merge must hold
    what the reference and verify compute with on the same CPU."""
    if device.type == "cpu" and weight.shape[-1] % nf4.blocksize == 0:
        try:
            return nf4_cpu.round_trip(weight, nf4.blocksize, nf4.quant_type, nf4.double_quant, torch.float32)
        except nf4_cpu.NonFinite:
            pass  # NaN or Inf weights: whatever bitsandbytes makes of them
    return _bitsandbytes_round_trip(weight.to(device=device, dtype=torch.float32), nf4)


def _bitsandbytes_round_trip(w: torch.Tensor, nf4: NF4Settings) -> torch.Tensor:
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(
        w,
        blocksize=nf4.blocksize,
        compress_statistics=nf4.double_quant,
        quant_type=nf4.quant_type,
        quant_storage=torch_dtype(nf4.quant_storage),
    )
    return F.dequantize_4bit(packed, state)
