"""qmerge.merge.nf4_cpu against bitsandbytes itself: the 4-bit codes (packed in every storage dtype),
the block absmax or its double quantization (8-bit codes, per-256 absmax, offset) and the dequantized
values, bit for bit, over shapes (sizes that are not a multiple of the blocksize included), every
blocksize, nf4/fp4, double quantization on and off, bf16/fp16/fp32 inputs; values on the decision
boundaries of both code tables; and every quantized weight of the embedded SmolLM2 (slow tier)."""

from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import FUZZ_CASES, examples
from qmerge.merge import nf4_cpu
from qmerge.merge.nf4 import exact_round_trip, quantize
from qmerge.settings import NF4Settings

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
STORAGE = [torch.uint8, torch.bfloat16, torch.float16, torch.float32]
CPU = torch.device("cpu")


def flat_dequantize(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' own dequantization with flat blocks (its default backend, as its CUDA kernel
    reads them), undecorated from torch.compile."""
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    code = F.get_4bit_type(state.quant_type, device="cpu")
    return _dequantize_4bit_compute.__wrapped__(packed.view(torch.uint8).reshape(-1), absmax, code, state.blocksize, state.shape, dtype)


def assert_same_as_bitsandbytes(weight: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool, storage: torch.dtype) -> None:
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type, quant_storage=storage)
    ours = nf4_cpu.quantize(weight, blocksize, quant_type, double_quant)
    mine = ours.packed(storage)
    assert mine.dtype == packed.dtype and mine.shape == packed.shape  # the bytes compared, not the values (some are NaN patterns)
    assert torch.equal(mine.view(torch.uint8), packed.view(torch.uint8))
    if double_quant:
        assert torch.equal(ours.nested.codes, state.absmax) and torch.equal(ours.nested.absmax, state.state2.absmax)
        assert torch.equal(ours.nested.offset, state.offset)
    else:
        assert torch.equal(ours.absmax, state.absmax)
    for dtype in (torch.float32, weight.dtype):
        expected = flat_dequantize(packed, state, dtype)
        assert torch.equal(nf4_cpu.dequantize(ours, dtype), expected)
        if weight.shape[-1] % blocksize == 0 and weight.numel() > 2:  # where bitsandbytes' CPU kernel reads flat blocks too
            state.dtype = dtype
            assert torch.equal(F.dequantize_4bit(packed, state), expected)


@st.composite
def cases(draw):
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    rows = draw(st.integers(1, 40))
    cols = draw(st.sampled_from([draw(st.integers(1, 300)), blocksize * draw(st.integers(1, 3)), blocksize + draw(st.integers(1, 63))]))
    storage = draw(st.sampled_from(STORAGE))
    assume((rows * cols + 1) // 2 % storage.itemsize == 0)  # a wider storage views whole groups of bytes
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    weight = torch.randn(rows, cols, generator=generator) * draw(st.sampled_from([1e-6, 1e-3, 0.05, 1.0, 30.0]))
    if weight.numel() > 2 and draw(st.booleans()):  # whole blocks of zeros, and a block whose largest value is repeated
        weight.view(-1)[: min(blocksize, weight.numel())] = 0
        weight.view(-1)[-1] = weight.view(-1)[-2] = weight.abs().max()
    dtype = draw(st.sampled_from(DTYPES))
    return weight.to(dtype), blocksize, draw(st.sampled_from(["nf4", "fp4"])), draw(st.booleans()), storage


@pytest.mark.parametrize("count", examples(quick=10, full=150))
def test_bit_identical_to_bitsandbytes(count):
    @settings(max_examples=count, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(cases())
    def check(case):
        FUZZ_CASES["nf4_cpu = bitsandbytes"] = FUZZ_CASES.get("nf4_cpu = bitsandbytes", 0) + 1
        assert_same_as_bitsandbytes(*case)

    check()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_values_on_the_decision_boundaries(quant_type):
    """Every midpoint between two codes, and its float32 neighbours, in a block whose absmax is 1
    (so the scaled value is the weight itself): ties go to the lower code, as bucketize puts them."""
    code = F.get_4bit_type(quant_type, device="cpu").sort().values
    midpoints = (code[:-1] + code[1:]) / 2
    near = torch.stack([torch.nextafter(midpoints, midpoints - 1), midpoints, torch.nextafter(midpoints, midpoints + 1)]).view(-1)
    weight = torch.cat([near, torch.tensor([1.0, -1.0, 0.0, -0.0])])
    weight = torch.nn.functional.pad(weight, (0, 64 - weight.numel())).view(1, 64)
    for double_quant in (False, True):
        assert_same_as_bitsandbytes(weight, 64, quant_type, double_quant, torch.uint8)


def test_double_quantization_at_every_step_of_the_8bit_table():
    """bitsandbytes' CPU blockwise 8-bit quantizer reads a 65,536-entry table: values at every step
    of that table and their float32 neighbours, in blocks of 256 holding a 1 (absmax 1)."""
    lut = nf4_cpu._dynamic_lut()
    steps = torch.nonzero(lut[1:] != lut[:-1]).view(-1) + 1
    at = ((steps.double() - 0.5) / 32767.5 - 1).float()
    values = torch.stack([torch.nextafter(at, at - 1), at, torch.nextafter(at, at + 1)], 1).view(-1)
    values = torch.nn.functional.pad(values, (0, -values.numel() % 255)).view(-1, 255)
    values = torch.cat([values, torch.ones(values.shape[0], 1)], 1).view(-1)
    codes, absmax = nf4_cpu.quantize_8bit(values)
    expected, state = F.quantize_blockwise(values, blocksize=256)
    assert torch.equal(codes, expected) and torch.equal(absmax, state.absmax)


def test_non_finite_weights_are_left_to_bitsandbytes():
    weight = torch.randn(4, 64)
    weight[1, 3] = float("nan")
    weight[2, 7] = float("inf")
    with pytest.raises(nf4_cpu.NonFinite):
        nf4_cpu.quantize(weight, 64, "nf4", True)
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    torch.testing.assert_close(exact_round_trip(weight, NF4Settings(), CPU), F.dequantize_4bit(packed, state), rtol=0, atol=0, equal_nan=True)


def test_bitsandbytes_cpu_dequantize_and_rows_that_are_not_whole_blocks():
    """bitsandbytes 0.50.2's CPU dequantize_4bit on AVX-512 machines reads scales per row: where a
    row is not a whole number of blocks it disagrees with its own flat blocks. qmerge's round trip
    gives what bitsandbytes' CPU kernel gives there (what the reference and verify compute with)."""
    weight = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert torch.equal(exact_round_trip(weight, NF4Settings(double_quant=False), CPU), F.dequantize_4bit(packed, state))
    assert torch.equal(nf4_cpu.dequantize(nf4_cpu.quantize(weight, 64, "nf4"), torch.float32), flat_dequantize(packed, state, torch.float32))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
def test_quantize_writes_what_bitsandbytes_saves(double_quant, quant_type, storage):
    """The run's nf4 stage writes each weight as Linear4bit saves it (packed codes and
    QuantState.as_dict(packed=True)): qmerge's CPU quantization, made into bitsandbytes' objects,
    saves the same tensors, dtypes and shapes as bitsandbytes' own quantize_4bit, and dequantizes
    to the same values."""
    weight = (torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    nf4 = NF4Settings(double_quant=double_quant, quant_type=quant_type, quant_storage=storage)
    packed, state = quantize(weight, nf4, CPU)
    expected, expected_state = F.quantize_4bit(weight.float(), blocksize=64, compress_statistics=double_quant, quant_type=quant_type, quant_storage=getattr(torch, storage))
    assert packed.dtype == expected.dtype and packed.shape == expected.shape and torch.equal(packed.view(torch.uint8), expected.view(torch.uint8))
    saved, expected_saved = state.as_dict(packed=True), expected_state.as_dict(packed=True)
    assert saved.keys() == expected_saved.keys()
    for key, tensor in saved.items():
        assert tensor.dtype == expected_saved[key].dtype and tensor.shape == expected_saved[key].shape and torch.equal(tensor, expected_saved[key]), key
    assert torch.equal(F.dequantize_4bit(packed, state), F.dequantize_4bit(expected, expected_state))


@pytest.mark.slow
def test_every_weight_of_smollm2(tmp_path):
    """Every linear weight bitsandbytes quantizes in the embedded SmolLM2-135M (210 tensors, 106M
    weights), with the QLoRA defaults, and a third of them with fp4, blocksize 128 and no double
    quantization."""
    from qmerge import demo
    from qmerge.io.checkpoint import LazyCheckpoint
    from qmerge.io.inputs import load_base_config
    from qmerge.merge.nf4 import quantized_linear_names

    base, _ = demo.prepare_inputs(echo=False)
    names = sorted(quantized_linear_names(load_base_config(base), NF4Settings()))
    checkpoint = LazyCheckpoint.open(base)
    assert len(names) == 210
    for i, name in enumerate(names):
        weight = checkpoint.get(f"{name}.weight")
        assert_same_as_bitsandbytes(weight, 64, "nf4", True, torch.uint8)
        if i % 3 == 0:
            assert_same_as_bitsandbytes(weight, 128, "fp4", False, torch.uint8)
