"""Fixtures: a tiny seeded random Llama with a trained-from-text BPE tokenizer, a QLoRA adapter made
the way a user makes one (PEFT on a bitsandbytes NF4 load, with random non-zero lora_B), one shared
`qmerge.run` of them that many tests assert on, and the CLI called in-process.

Tiers: `pytest -m "not slow"` is the fast tier (minutes); the slow marker takes the embedded SmolLM2,
SIGKILL/resume, serving, Chromium, cgroup, tmpfs and full-count hypothesis runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def make_tokenizer(directory: Path, vocab_size: int, add_bos: bool = False, specials: tuple[str, ...] = ()) -> None:
    """A byte-level BPE trained on the stdlib corpus; `add_bos`: it puts <s> before every text, as
    Llama's, Gemma's and Mistral's do; `specials`: more special tokens a family's tokenizer class expects."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from qmerge.io.corpus import stdlib_part

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *specials], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_part("train")[:300], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}"
    fast.save_pretrained(directory)


def make_base(directory: Path, seed: int = 0, add_bos: bool = False, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, "tie_word_embeddings": False, **overrides})
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    make_tokenizer(directory, config.vocab_size, add_bos)
    return directory


def make_qlora_adapter(base: Path, directory: Path, seed: int = 1, **lora) -> Path:
    """PEFT's own QLoRA model on the NF4 load; lora_B set non-zero (and every other trained tensor moved)
    so the delta is real."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qmerge.merge.nf4 import bnb_config
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


# The shared run's settings: GPTQ group 32 (the tiny model's in_features are 64 and 128), short windows.
SMALL_RUN = {"group_size": 32, "seq_len": 64, "calibration_samples": 16, "eval_samples": 6}


@pytest.fixture(scope="session")
def other_text(tmp_path_factory) -> Path:
    """A second eval set: the stdlib corpus' train part, disjoint from the calibration part."""
    from qmerge.io.corpus import stdlib_part

    path = tmp_path_factory.mktemp("eval") / "other.txt"
    path.write_text("\n\n".join(stdlib_part("train")[:200]))
    return path


@pytest.fixture(scope="session")
def tiny_run(tiny_base, tiny_adapter, other_text, tmp_path_factory):
    """One `qmerge.run` through the Python API, as a deploy script calls it: GPTQ and every candidate
    kind (gptq-original included), two eval sets, a quality budget. Its outputs are what most tests of
    the pipeline, the drift report and the deploy path assert on."""
    import qmerge

    return qmerge.run(str(tiny_base), str(tiny_adapter), tmp_path_factory.mktemp("run") / "out", **tiny_run_settings(other_text))


def tiny_run_settings(other_text: Path) -> dict:
    from qmerge.settings import CANDIDATE_KINDS

    return {"max_kld": 1.0, "candidates": list(CANDIDATE_KINDS), "eval": f"stdlib,{other_text}", **SMALL_RUN}


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capfd):
    """`qmerge ARGS...` in this process (cli.main), its exit status and what it wrote to stdout and
    stderr (file-descriptor level, as --json redirects there): the CLI's own code path without a
    fresh interpreter importing torch for each call."""
    from qmerge import cli as cli_module

    def call(*args: str) -> CliResult:
        capfd.readouterr()
        try:
            status = cli_module.main([str(a) for a in args])
        finally:
            logging.disable(logging.NOTSET)  # main quiets library logging process-wide
        out, err = capfd.readouterr()
        return CliResult(status, out, err)

    return call


def one_line_error(result: CliResult, status: int = 2, *words: str) -> str:
    """A refusal: exit `status`, exactly one line on stderr, naming each of `words`."""
    assert result.returncode == status, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    if status == 2:
        assert lines[0].startswith("qmerge: error: "), lines[0]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def strict_report(path: Path) -> dict:
    """A report.json read with a strict JSON parser: NaN and Infinity are not JSON and fail the test."""
    import json

    def refuse(constant: str):
        pytest.fail(f"{path} holds {constant}, which is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def examples(quick: int, full: int) -> list:
    """hypothesis example counts: a quick pass in the fast tier, the full count in the slow tier."""
    return [pytest.param(quick, id=f"{quick}-examples"), pytest.param(full, id=f"{full}-examples", marks=pytest.mark.slow)]


def reference_model(base: Path, adapter: Path, nf4=None):
    """The oracle: PEFT's QLoRA model (NF4 base + adapter, unmerged), computing in float32 with the
    weights bitsandbytes' forward computes with in training (bnb_computed_weight), not qmerge's code."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qmerge.merge.nf4 import bnb_config
    from qmerge.settings import NF4Settings

    import bitsandbytes as bnb

    nf4 = nf4 or NF4Settings()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=bnb_config(nf4, "float32"))
    for name, m in list(model.named_modules()):
        if isinstance(m, bnb.nn.Linear4bit):
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(bnb_computed_weight(m, getattr(torch, nf4.compute_dtype)))
                if m.bias is not None:
                    linear.bias.copy_(m.bias.float())
            model.set_submodule(name, linear)
    return PeftModel.from_pretrained(model, adapter).eval()


def loaded_linear(weight: torch.Tensor, nf4):
    """A Linear4bit quantized as transformers' load quantizes one (integrations/bitsandbytes.py,
    Bnb4bitQuantize: Params4bit(value, **old.__dict__).to(device)), blocksize set on the parameter
    (BitsAndBytesConfig has no blocksize)."""
    import bitsandbytes as bnb

    module = bnb.nn.Linear4bit(
        weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.float32, compress_statistics=nf4.double_quant,
        quant_type=nf4.quant_type, quant_storage=getattr(torch, nf4.quant_storage),
    )
    old = module.weight
    old.blocksize = nf4.blocksize
    module.weight = bnb.nn.Params4bit(weight, requires_grad=False, **old.__dict__).to(weight.device)
    return module.eval()


def bnb_computed_weight(module, compute_dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight a bitsandbytes Linear4bit's forward multiplies by when it computes in
    `compute_dtype`, as bitsandbytes itself computes it: matmul_4bit of the identity (each output
    element one product with 1, exact), as float32."""
    import bitsandbytes as bnb

    eye = torch.eye(module.in_features, dtype=compute_dtype)
    with torch.no_grad():
        return bnb.matmul_4bit(eye, module.weight.t(), quant_state=module.weight.quant_state).T.float()


def gptq_oracle(path: Path):
    """A GPTQ checkpoint as transformers loads it, each GPTQModel layer replaced by a float32 nn.Linear
    of GPTQModel's own dequantize_weight (scales upcast first, so its product is exact in float32):
    the checkpoint's weights in float32 without qmerge's unpacking."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseQuantLinear):
            module.scales = module.scales.float()
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.dequantize_weight().T.float())
                if module.bias is not None:
                    linear.bias.copy_(module.bias.float())
            model.set_submodule(name, linear)
    return model.eval()


def mean_kld(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(P‖Q) per position, averaged: written out independently of qmerge.eval.metrics."""
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


FUZZ_CASES: dict[str, int] = {}


def pytest_terminal_summary(terminalreporter):
    """Fuzz tests report how many cases they ran."""
    for name, n in sorted(FUZZ_CASES.items()):
        terminalreporter.write_line(f"fuzz: {name}: {n} cases")
