"""bitsandbytes' 4-bit quantization as a training run's load applied it: which linear layers it
quantized, with which settings, and the round trip dequantize(quantize_4bit(W)) of one weight.

QLoRA trains against dequantize(quantize_nf4(W)), not W. bitsandbytes packs the same 4-bit codes
whatever the input dtype (bf16 or its exact float32 upcast); only the dequantized output's rounding
depends on it, so the round trip runs in float32 and yields the exact NF4 values.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from qmerge.io.dtypes import torch_dtype
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


def quantize(weight: torch.Tensor, nf4: NF4Settings, device: torch.device):
    """quantize_4bit(W) with bitsandbytes' own kernels, from float32 on `device`: (packed codes, QuantState)."""
    import bitsandbytes.functional as F

    w = weight.to(device=device, dtype=torch.float32)
    return F.quantize_4bit(
        w,
        blocksize=nf4.blocksize,
        compress_statistics=nf4.double_quant,
        quant_type=nf4.quant_type,
        quant_storage=torch_dtype(nf4.quant_storage),
    )


def round_trip(weight: torch.Tensor, nf4: NF4Settings, device: torch.device) -> torch.Tensor:
    """dequantize(quantize_4bit(W)) with bitsandbytes' own kernels, as float32 on `device`."""
    import bitsandbytes.functional as F

    return F.dequantize_4bit(*quantize(weight, nf4, device))
