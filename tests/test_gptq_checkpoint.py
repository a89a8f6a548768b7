"""The GPTQ checkpoint as qmerge reads and checks it: its weights unpacked exactly as GPTQModel
unpacks them (every bit width), a layer that is not its merged layer quantized refused before
hand-over, and a checkpoint missing a tensor refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import gptq_oracle
from qmerge.errors import QmergeError, VerifyError
from qmerge.quant import structure
from qmerge.quant.gptq_check import check_layers
from qmerge.quant.gptq_float import load_float32
from qmerge.settings import GPTQSettings

CPU = torch.device("cpu")


def same_weights(gptq_dir) -> int:
    """Every quantized layer: qmerge's float32 weight (made from the stored levels as the layer runs)
    == GPTQModel's own dequantization (exact); returns how many."""
    ours, theirs = dict(load_float32(gptq_dir, CPU).named_modules()), dict(gptq_oracle(gptq_dir).named_modules())
    names = [n for n in structure.of_checkpoint(gptq_dir.parent / "merged").shapes]
    for name in names:
        assert torch.equal(ours[name].float_weight(), theirs[name].weight), name
    return len(names)


def test_weights_are_gptqmodels_dequantization(tiny_run):
    assert same_weights(tiny_run.out / "gptq") == 14


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_weights_are_gptqmodels_dequantization_at_every_bit_width(tiny_run, tmp_path, bits):
    """3-bit codes straddle int32 words; 2 and 8 pack 16 and 4 per word. Made through the Python API
    with the group size left to auto (64 on the tiny model)."""
    import qmerge

    (tmp_path / "merged").symlink_to(tiny_run.out / "merged")
    made = qmerge.gptq_quantize(tmp_path / "merged", tmp_path / "gptq", bits=bits, calibration_samples=8, seq_len=64, device="cpu")
    assert json.loads((made.path / "quantize_config.json").read_text())["group_size"] == 64
    assert same_weights(tmp_path / "gptq") == 14


@pytest.fixture
def gptq_copy(tiny_run, tmp_path):
    copy = tmp_path / "gptq"
    shutil.copytree(tiny_run.out / "gptq", copy)
    return copy


def test_a_layer_that_is_not_its_merged_layer_is_refused(tiny_run, gptq_copy):
    """Two layers' tensors swapped (what fused parts written in the wrong order would look like)."""
    path = gptq_copy / "model.safetensors"
    tensors = load_file(path)
    a, b = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    for suffix in ("qweight", "qzeros", "scales"):
        tensors[f"{a}.{suffix}"], tensors[f"{b}.{suffix}"] = tensors[f"{b}.{suffix}"], tensors[f"{a}.{suffix}"]
    save_file(tensors, path, metadata={"format": "pt"})
    layers = structure.of_checkpoint(tiny_run.out / "merged")
    with pytest.raises(VerifyError, match=f"{a} is not the merged layer quantized"):
        check_layers(gptq_copy, tiny_run.out / "merged", layers, GPTQSettings(bits=4, group_size=32))


@pytest.mark.parametrize("key", ["model.layers.1.input_layernorm.weight", "model.layers.0.mlp.up_proj.scales"])
def test_a_checkpoint_missing_a_tensor_is_refused_by_name(gptq_copy, key):
    path = gptq_copy / "model.safetensors"
    tensors = load_file(path)
    del tensors[key]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(QmergeError, match=f"lacks tensor {key}"):
        load_float32(gptq_copy, CPU)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_whole_word_unpacking_equals_the_general_path(bits):
    """2/4/8-bit codes fill int32 words and come out by shifts in int32; they equal the general
    (straddling) path's, sign bit set included, for a count that ends inside a word."""
    from qmerge.quant import gptq_weights

    packed = torch.randint(-2**31, 2**31 - 1, (6, 5), dtype=torch.int32)
    count = 6 * 32 // bits - 1
    fast = gptq_weights.unpack(packed, bits, count)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    start = torch.arange(count) * bits
    general = (words[start // 32] >> (start % 32)[:, None]) & ((1 << bits) - 1)
    assert torch.equal(fast.long(), general)
