"""Merge fidelity against the oracle: PEFT's own QLoRA model (NF4 base + adapter, unmerged), on the
weights bitsandbytes itself computes with (conftest.bnb_computed_weight: its matmul_4bit of the
identity), never on qmerge's dequantization."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import bnb_computed_weight, loaded_linear, mean_kld, reference_model
from qmerge.merge.adapter import load_adapter
from qmerge.io.checkpoint import LazyCheckpoint
from qmerge.merge.streaming import merge
from qmerge.merge.nf4 import bnb_config, quantized_linear_names, round_trip
from qmerge.settings import NF4Settings

CPU = torch.device("cpu")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(7)
    return torch.randint(3, 512, (4, 48))


def test_round_trip_is_what_bitsandbytes_computes_with(tiny_base):
    """A training-style load (bf16 weights, bf16 compute): for every layer bitsandbytes quantized,
    round_trip equals the weight its matmul_4bit multiplies by, bit for bit."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16, quantization_config=bnb_config(NF4Settings()))
    base = LazyCheckpoint.open(tiny_base)
    names = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert names == quantized_linear_names(model.config, NF4Settings())
    assert "lm_head" not in names and len(names) == 14
    for name in names:
        ours = round_trip(base.get(f"{name}.weight"), NF4Settings(), CPU)
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours.float(), bnb_computed_weight(model.get_submodule(name), torch.bfloat16)), name


def saved_as(base: Path, out: Path, dtype: torch.dtype) -> Path:
    """The tiny base stored in another dtype (an fp16 or fp32 base)."""
    if not out.exists():
        AutoModelForCausalLM.from_pretrained(base, dtype=dtype).save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).write_bytes((base / name).read_bytes())
    return out


def expected_merge(base: Path, adapter: Path, nf4: NF4Settings, stored: torch.dtype) -> dict[str, torch.Tensor]:
    """Per LoRA'd 4-bit layer: stored(bitsandbytes' own computed weight + PEFT's float32 delta), the
    rounding done once, from bitsandbytes and PEFT alone. A blocksize other than transformers' 64 is
    quantized as transformers quantizes a layer, from the stored weight (conftest.loaded_linear)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=bnb_config(nf4))
    peft = PeftModel.from_pretrained(model, adapter)
    stored_base = LazyCheckpoint.open(base)
    compute = getattr(torch, nf4.compute_dtype)
    out = {}
    for name, layer in peft.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and isinstance(layer.base_layer, bnb.nn.Linear4bit):
            key = f"{name}.weight"
            quantized = layer.base_layer if nf4.blocksize == 64 else loaded_linear(stored_base.get(key), nf4)
            with torch.no_grad():
                delta = layer.get_delta_weight("default").float()
                out[key] = (bnb_computed_weight(quantized, compute) + delta).to(stored)
    return out


def merge_is_bnb_plus_delta(base: Path, adapter: Path, tmp: Path, nf4: NF4Settings, stored: str) -> None:
    out = tmp / f"{nf4.blocksize}-{nf4.double_quant}-{nf4.compute_dtype}-{stored}"
    merge(base, load_adapter(adapter), out, nf4, stored, CPU, show_progress=False)
    expected = expected_merge(base, adapter, nf4, getattr(torch, stored))
    merged = LazyCheckpoint.open(out)
    assert len(expected) >= 14  # every linear layer of a decoder block (7 per block)
    for key, value in expected.items():
        got = merged.get(key)
        assert got.dtype == value.dtype and torch.equal(got, value), (key, (got.float() - value.float()).abs().max().item())


CASES = [  # (base dtype, compute dtype, merged dtype, blocksizes)
    pytest.param("bfloat16", "bfloat16", "bfloat16", (64,), id="bf16"),
    pytest.param("bfloat16", "bfloat16", "bfloat16", BLOCKSIZES, id="bf16-every-blocksize", marks=pytest.mark.slow),
    pytest.param("float16", "float16", "float16", (64, 256), id="fp16", marks=pytest.mark.slow),
    pytest.param("float32", "float32", "float32", (64, 256), id="fp32", marks=pytest.mark.slow),
    pytest.param("bfloat16", "float32", "bfloat16", (64,), id="bf16-base-fp32-compute", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("base_dtype, compute, stored, blocksizes", CASES)
def test_merged_elements_are_bnb_value_plus_delta_rounded_once(tiny_base, tiny_adapter, tmp_path, base_dtype, compute, stored, blocksizes):
    """Every element of every LoRA'd 4-bit weight: stored(bitsandbytes' computed value + delta in float32),
    bit for bit, double quantization on and off."""
    base = tiny_base if base_dtype == "bfloat16" else saved_as(tiny_base, tmp_path / base_dtype, getattr(torch, base_dtype))
    for blocksize in blocksizes:
        for double_quant in (True, False):
            nf4 = NF4Settings(blocksize=blocksize, double_quant=double_quant, compute_dtype=compute)
            merge_is_bnb_plus_delta(base, tiny_adapter, tmp_path, nf4, stored)


def test_prequantized_base_merge_is_bnb_value_plus_delta(tiny_base, tiny_adapter, tmp_path):
    """A pre-quantized base (its stored state in bf16, no double quantization): the same rule, from its stored codes."""
    nf4 = NF4Settings(double_quant=False)
    pre = tmp_path / "pre"
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16, quantization_config=bnb_config(nf4)).save_pretrained(pre)
    (pre / "tokenizer.json").write_bytes((tiny_base / "tokenizer.json").read_bytes())
    merge_is_bnb_plus_delta(pre, tiny_adapter, tmp_path, nf4, "bfloat16")


@pytest.mark.slow
def test_real_weights_merge_is_bnb_value_plus_delta(tmp_path):
    """The embedded SmolLM2-135M (real bf16 weights) and its demo QLoRA adapter."""
    from qmerge import demo

    base, adapter = demo.prepare_inputs(echo=False)
    merge_is_bnb_plus_delta(base, adapter, tmp_path, NF4Settings(), "bfloat16")


def _merged_logits(tiny_base, tiny_adapter, tmp_path, tokens, into):
    out = tmp_path / into
    merge(tiny_base, load_adapter(tiny_adapter), out, NF4Settings(), "float32", CPU, into=into, show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def test_merge_into_nf4_matches_peft_qlora_model(tiny_base, tiny_adapter, tmp_path, tokens):
    with torch.no_grad():
        ref = reference_model(tiny_base, tiny_adapter)(tokens).logits
    nf4 = mean_kld(ref, _merged_logits(tiny_base, tiny_adapter, tmp_path, tokens, "nf4"))
    original = mean_kld(ref, _merged_logits(tiny_base, tiny_adapter, tmp_path, tokens, "original"))
    assert nf4 <= 1e-6, nf4  # float32 merge on bitsandbytes' own values: float32 summation order only
    assert original > 1e-4 and original > 100 * nf4, (original, nf4)


def test_merged_checkpoint_is_plain_hf(tiny_base, tiny_adapter, tmp_path):
    out = tmp_path / "merged"
    result = merge(tiny_base, load_adapter(tiny_adapter), out, NF4Settings(), "bfloat16", CPU, show_progress=False)
    assert (result.nf4_modules, result.lora_modules) == (14, 14)
    config = (out / "config.json").read_text()
    assert "quantization_config" not in config and '"dtype": "bfloat16"' in config
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    assert LazyCheckpoint.open(out).get("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
