"""Property tests of the NF4 round trip: over shapes (sizes that are not a multiple of the blocksize
included), input dtypes, blocksizes, quant types, double quantization, storage and compute dtypes,
qmerge's exact round trip is bit for bit what a real bitsandbytes Linear4bit holds after quantizing
the same weight the way transformers' load does, before and after a CPU forward, and its round trip
is bit for bit the weight that Linear4bit's matmul_4bit multiplies by in the compute dtype."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import FUZZ_CASES, bnb_computed_weight, examples, loaded_linear
from qmerge.io.dtypes import dtype_name
from qmerge.merge.nf4 import exact_round_trip, round_trip
from qmerge.settings import NF4Settings

CPU = torch.device("cpu")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
STORAGE = [torch.uint8, torch.bfloat16, torch.float16, torch.float32]
COUNTS = examples(quick=10, full=40)


def runs(count: int):
    return settings(max_examples=count, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


def dequantized(module: bnb.nn.Linear4bit) -> torch.Tensor:
    """The exact 4-bit values a Linear4bit holds: its codes and scales dequantized in float32."""
    state = copy.copy(module.weight.quant_state)
    state.dtype = torch.float32
    return F.dequantize_4bit(module.weight.data, state)


def exact_scales(weight: torch.Tensor, nf4: NF4Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """qmerge's side, from bitsandbytes' quantize_4bit of the float32 weight: packed codes and the
    per-block scales (double quantization undone)."""
    packed, state = F.quantize_4bit(weight.float(), blocksize=nf4.blocksize, compress_statistics=nf4.double_quant, quant_type=nf4.quant_type)
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    return packed, absmax


@st.composite
def cases(draw, repackable: bool = False):
    blocksize = draw(st.sampled_from([32, 64, 128, 256] if not repackable else [32, 64]))
    if repackable:  # bitsandbytes' CPU repack needs rows % 32 == 0 and whole blocks per row
        rows, cols = 32 * draw(st.integers(1, 3)), blocksize * draw(st.integers(1, 4))
    else:
        rows, cols = draw(st.integers(1, 80)), draw(st.integers(1, 300))
    # bitsandbytes' dequantize_4bit returns a weight of 1 or 2 elements transposed (it takes a one-row
    # packed tensor for a transposed one); no linear layer is that small
    assume(rows * cols > 2)
    storage = draw(st.sampled_from(STORAGE if not repackable else [torch.uint8]))
    # a wider storage dtype views the packed bytes in groups: bitsandbytes refuses sizes that do not fill one
    assume((rows * cols + 1) // 2 % storage.itemsize == 0)
    nf4 = NF4Settings(
        quant_type=draw(st.sampled_from(["nf4", "fp4"])), double_quant=draw(st.booleans()), blocksize=blocksize,
        quant_storage=dtype_name(storage), compute_dtype=dtype_name(draw(st.sampled_from(DTYPES))),
    )
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))  # typical weights, and scales far from them
    weight = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    return weight, nf4


@pytest.mark.parametrize("count", COUNTS)
def test_round_trip_is_what_linear4bit_holds(count):
    """Bit for bit, before and after a forward with the repack off (as qmerge's reference runs)."""
    runs(count)(given(cases())(round_trip_is_what_linear4bit_holds))()


def round_trip_is_what_linear4bit_holds(case) -> None:
    FUZZ_CASES["nf4 round trip = Linear4bit"] = FUZZ_CASES.get("nf4 round trip = Linear4bit", 0) + 1
    weight, nf4 = case
    module = loaded_linear(weight, nf4)
    ours = exact_round_trip(weight, nf4, CPU)
    assert ours.dtype == torch.float32 and ours.shape == weight.shape
    assert torch.equal(ours, dequantized(module))
    # in the input's own dtype too: what bitsandbytes dequantizes to when the model is loaded in it
    assert torch.equal(ours.to(weight.dtype), F.dequantize_4bit(module.weight.data, module.weight.quant_state))
    # what its forward multiplies by: the round trip, in the compute dtype
    computed = round_trip(weight, nf4, CPU)
    assert computed.dtype == getattr(torch, nf4.compute_dtype)
    assert torch.equal(computed.float(), bnb_computed_weight(module, computed.dtype))
    module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        module(torch.randn(3, weight.shape[1]))
    assert torch.equal(ours, dequantized(module))


@pytest.mark.skipif(not F.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
@pytest.mark.parametrize("count", COUNTS)
def test_cpu_repack_keeps_the_codes_and_rounds_the_scales_to_bf16(count):
    """After an inference forward on such a CPU, Linear4bit computes with the same 4-bit codes but
    bf16-rounded block scales (not the weights it trained with): why qmerge's reference turns the
    repack off. Checked on the repacked tensors themselves (bitsandbytes' own inverse transposes
    non-nested scales)."""
    runs(count)(given(cases(repackable=True))(repack_keeps_codes))()


def repack_keeps_codes(case) -> None:
    FUZZ_CASES["nf4 CPU repack"] = FUZZ_CASES.get("nf4 CPU repack", 0) + 1
    weight, nf4 = case
    module = loaded_linear(weight, nf4)
    with torch.no_grad():
        module(torch.randn(3, weight.shape[1]))
    state = module.weight.quant_state
    assert state.packing_format_for_cpu and state.absmax.dtype == torch.bfloat16
    packed, absmax = exact_scales(weight, nf4)
    codes, _ = F._convert_weight_packed_for_cpu_inverse(module.weight.data, copy.copy(state))
    assert torch.equal(codes, packed)
    rows, cols = weight.shape
    assert torch.equal(state.absmax, absmax.reshape(rows, cols // nf4.blocksize).T.to(torch.bfloat16))
