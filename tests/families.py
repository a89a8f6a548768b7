"""Tiny random models of the architectures people fine-tune with QLoRA, built from transformers' own
config classes (one per family, each with the feature that sets it apart), with a tokenizer trained
like conftest's (BOS added where the family's tokenizer adds it) and a QLoRA adapter made by PEFT on
bitsandbytes' 4-bit load, all-linear."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

from conftest import make_qlora_adapter, make_tokenizer

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# family -> (config, its tokenizer adds BOS, what sets it apart)
FAMILIES = {
    "llama": (lambda: T.LlamaConfig(**COMMON, tie_word_embeddings=False), True, "untied embeddings"),
    "qwen2": (lambda: T.Qwen2Config(**COMMON), False, "q/k/v biases"),
    "mistral": (lambda: T.MistralConfig(**COMMON, sliding_window=32), True, "sliding-window attention"),
    "gemma3": (
        lambda: T.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=32, layer_types=["sliding_attention", "full_attention"]),
        True, "tied embeddings, sliding-window layers, embedding scaling",
    ),
    "phi3": (lambda: T.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2), False, "fused qkv_proj and gate_up_proj"),
    "qwen2_moe": (
        lambda: T.Qwen2MoeConfig(**COMMON, moe_intermediate_size=64, shared_expert_intermediate_size=128, num_experts=4, num_experts_per_tok=2),
        False, "MoE: experts fused by transformers 5, router, shared expert and its gate",
    ),
}


# an architecture transformers has and GPTQModel 7.7 has no definition for: GPTQ refused up front
UNKNOWN_TO_GPTQMODEL = {"helium": (lambda: T.HeliumConfig(**COMMON, head_dim=16), True, "no GPTQModel definition")}


def make_family(name: str, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(base, adapter) of one family under `root` (bf16 weights; <|endoftext|> in the vocabulary, which
    Qwen2's tokenizer class adds when it is missing)."""
    config_of, add_bos, _ = {**FAMILIES, **UNKNOWN_TO_GPTQMODEL}[name]
    base, adapter = root / name / "base", root / name / "adapter"
    torch.manual_seed(seed)
    config = config_of()
    T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(base)
    make_tokenizer(base, config.vocab_size, add_bos, specials=("<|endoftext|>",))
    make_qlora_adapter(base, adapter)
    return base, adapter
