"""Fixtures: a tiny seeded random Llama with a trained-from-text BPE tokenizer, and a QLoRA adapter
made the way a user makes one: PEFT on a bitsandbytes NF4 load, with random non-zero lora_B."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def make_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qmerge.data import stdlib_part

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_part("train")[:300], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}"
    fast.save_pretrained(directory)


def make_base(directory: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, "tie_word_embeddings": False, **overrides})
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    make_tokenizer(directory, config.vocab_size)
    return directory


def make_qlora_adapter(base: Path, directory: Path, seed: int = 1, **lora) -> Path:
    """PEFT's own QLoRA model on the NF4 load; lora_B set non-zero (and every other trained tensor moved)
    so the delta is real."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qmerge.nf4 import bnb_config
    from qmerge.settings import NF4Settings

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=bnb_config(NF4Settings(), "float32"))
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0, **lora})
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name or "lora_embedding_A" in name:  # the factors PEFT starts at zero
            p.data.normal_(0, 0.05)
        elif p.requires_grad and "lora_A" not in name and "lora_embedding_B" not in name:
            p.data += torch.randn_like(p) * 0.05  # DoRA magnitudes, modules_to_save copies, token rows, biases
    peft_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base, tmp_path_factory) -> Path:
    return make_qlora_adapter(tiny_base, tmp_path_factory.mktemp("tiny") / "adapter")


def reference_model(base: Path, adapter: Path):
    """The oracle: PEFT's QLoRA model (NF4 base + adapter, unmerged), computing in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qmerge.nf4 import bnb_config
    from qmerge.settings import NF4Settings

    import bitsandbytes as bnb

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=bnb_config(NF4Settings(), "float32"))
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # else bitsandbytes computes in bf16 on such CPUs
    return PeftModel.from_pretrained(model, adapter).eval()


def mean_kld(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(P‖Q) per position, averaged: written out independently of qmerge.metrics."""
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


FUZZ_CASES: dict[str, int] = {}


def pytest_terminal_summary(terminalreporter):
    """Fuzz tests report how many cases they ran."""
    for name, n in sorted(FUZZ_CASES.items()):
        terminalreporter.write_line(f"fuzz: {name}: {n} cases")
