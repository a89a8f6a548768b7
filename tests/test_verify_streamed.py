"""verify's recomputation, module by module (qmerge.eval.expected), gives exactly the tensors of PEFT's
merge_and_unload on a whole float32 copy of the base (the way verify computed it before), for the
adapter variants whose merge touches more than a linear layer: DoRA, biases, modules_to_save,
trainable tokens, LoRA on embeddings and lm_head, tied embeddings, a weighted mix."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_base, make_qlora_adapter
from qmerge.eval.expected import peft_merged
from qmerge.merge.adapter import load_mix
from qmerge.models.base import dequantized, load_base
from qmerge.models.reference import peft_model
from qmerge.settings import NF4Settings
from test_variants import VARIANTS

CPU = torch.device("cpu")


def whole_copy_merge(base_dir, mix, kind: str) -> dict[str, torch.Tensor]:
    """The oracle: PEFT's merge_and_unload on a float32 copy of the whole base as the adapter saw it
    (4-bit dequantized, or the 16-bit weights for a plain LoRA)."""
    base = dequantized(load_base(base_dir, NF4Settings(), CPU)) if kind == "qlora" else AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft_model(base, mix).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


def check(base_dir, mix, kind: str = "qlora") -> None:
    expected = whole_copy_merge(base_dir, mix, kind)
    streamed = dict(peft_merged(load_base(base_dir, NF4Settings(), CPU, kind), mix))
    assert set(streamed) == set(expected)
    for key, tensor in expected.items():
        assert streamed[key].dtype == torch.float32 and torch.equal(streamed[key], tensor.float()), key


CASES = {
    "dora": ("untied", VARIANTS["dora"]),
    "tied-lora-on-embeddings-and-lm-head": ("tied", VARIANTS["lora_on_embeddings_and_lm_head"]),
    "modules_to_save": ("untied", VARIANTS["modules_to_save"]),
    "trainable_tokens_on_lm_head": ("untied", VARIANTS["trainable_tokens_on_lm_head"]),
    "tied-trainable-tokens": ("tied", VARIANTS["trainable_token_indices"]),
    "lora_bias": ("biased", dict(target_modules="all-linear", lora_bias=True, bias="all")),
}
FAST = ("dora", "tied-lora-on-embeddings-and-lm-head")


@pytest.fixture(scope="module")
def bases(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"untied": tiny_base, "tied": make_base(root / "tied", tie_word_embeddings=True), "biased": make_base(root / "biased", attention_bias=True, mlp_bias=True)}


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c in FAST else pytest.mark.slow) for c in CASES])
def test_streamed_merge_equals_whole_copy(case, bases, tmp_path):
    base_kind, lora = CASES[case]
    adapter = make_qlora_adapter(bases[base_kind], tmp_path / "adapter", **lora)
    check(bases[base_kind], load_mix((str(adapter),)))


@pytest.mark.slow
def test_weighted_mix(tiny_base, tmp_path):
    a = make_qlora_adapter(tiny_base, tmp_path / "a", target_modules=["q_proj", "v_proj"], seed=1)
    b = make_qlora_adapter(tiny_base, tmp_path / "b", target_modules=["q_proj", "k_proj", "embed_tokens", "lm_head"], use_rslora=True, r=4, seed=2)
    check(tiny_base, load_mix((f"{a}:0.7", f"{b}:0.3")))


def test_plain_lora_on_the_16_bit_base(tiny_base, tiny_adapter):
    """--merge-into original: the base held in 16 bits, each module upcast just before PEFT merges it."""
    check(tiny_base, load_mix((str(tiny_adapter),)), "lora")
