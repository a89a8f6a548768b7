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
    """dequantize(quantize_4bit(W)), exact (code × absmax), as float32 on `device`."""
    import bitsandbytes.functional as F

    w = weight.to(device=device, dtype=torch.float32)
    q = _reproduced(w, nf4)
    return nf4_cpu.dequantize(q, torch.float32) if q is not None else F.dequantize_4bit(*_bitsandbytes_quantize(w, nf4))


def quantize(weight: torch.Tensor, nf4: NF4Settings, device: torch.device):
    """quantize_4bit(W) from float32 on `device`: (packed codes, QuantState), as bitsandbytes' own."""
    w = weight.to(device=device, dtype=torch.float32)
    q = _reproduced(w, nf4)
    return as_bitsandbytes(q, torch_dtype(nf4.quant_storage)) if q is not None else _bitsandbytes_quantize(w, nf4)


def _reproduced(w: torch.Tensor, nf4: NF4Settings) -> nf4_cpu.Quantized | None:
    """bitsandbytes' quantization of `w` computed by qmerge.merge.nf4_cpu, or None where bitsandbytes
    itself computes it. On the CPU bitsandbytes looks each weight up by a scalar binary search, 3–24×
    slower than nf4_cpu's bit-identical reproduction (BENCHMARKS.md). A weight whose rows are not whole blocks stays
    with bitsandbytes: its CPU kernel on AVX-512 dequantizes such rows' scales per row rather than
    per flat block, and the merge must hold what the reference and verify compute with on the same
    CPU; so do NaN or Inf weights (whatever bitsandbytes makes of them)."""
    if w.device.type != "cpu" or w.shape[-1] % nf4.blocksize:
        return None
    try:
        return nf4_cpu.quantize(w, nf4.blocksize, nf4.quant_type, nf4.double_quant)
    except nf4_cpu.NonFinite:
        return None


def _bitsandbytes_quantize(w: torch.Tensor, nf4: NF4Settings):
    import bitsandbytes.functional as F

    return F.quantize_4bit(w, blocksize=nf4.blocksize, compress_statistics=nf4.double_quant, quant_type=nf4.quant_type, quant_storage=torch_dtype(nf4.quant_storage))


def as_bitsandbytes(q: nf4_cpu.Quantized, storage: torch.dtype):
    """nf4_cpu's result as bitsandbytes' quantize_4bit returns it: (packed codes, QuantState), the
    nested state as its quantize_blockwise makes it."""
    from bitsandbytes.functional import QuantState, get_4bit_type

    code = get_4bit_type(q.quant_type, device="cpu")
    if q.nested is None:
        state = QuantState(absmax=q.absmax, shape=q.shape, code=code, blocksize=q.blocksize, quant_type=q.quant_type, dtype=q.dtype)
    else:
        inner = QuantState(absmax=q.nested.absmax, code=nf4_cpu.dynamic_map(), blocksize=nf4_cpu.NESTED_BLOCK, dtype=torch.float32)
        state = QuantState(absmax=q.nested.codes, shape=q.shape, code=code, blocksize=q.blocksize, quant_type=q.quant_type, dtype=q.dtype,
                           offset=q.nested.offset, state2=inner)
    return q.packed(storage), state
