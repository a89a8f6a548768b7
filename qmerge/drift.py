"""Drift of each candidate from the reference, the QLoRA model as trained (base loaded in 4-bit by
bitsandbytes, adapter unmerged via PEFT), on one shared token stream.

Every model computes in float32, so the numbers measure weights rather than arithmetic. The
training-time compute dtype (bf16 by default) is measured separately as the noise floor: the same
reference with its 4-bit layers computing in that dtype. Reference and candidates run window batch
by window batch, so full-vocabulary logits exist for one batch only (never for the whole eval set);
the price is that all models are resident at once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from qmerge.metrics import log_probs, summarize, token_stats
from qmerge.nf4 import load_base, reference, torch_dtype
from qmerge.settings import NF4Settings

NOISE_FLOOR = "noise floor (reference @ training compute dtype)"


def load_reference(base_dir: Path, adapter_dir: Path, nf4: NF4Settings, device: torch.device, trust_remote_code: bool = False, kind: str = "qlora"):
    """Base as the adapter saw it (qlora: quantized by bitsandbytes at load, or pre-quantized; lora:
    16-bit) + the adapter, unmerged: the model as trained (qmerge.nf4.reference)."""
    return reference(base_dir, adapter_dir, nf4, device, kind, trust_remote_code)


def candidate_dtype(path: Path, device: torch.device) -> torch.dtype:
    """float32, except a quantized checkpoint on CUDA: GPTQModel picks Marlin there, which computes
    in float16 only (as servers run it)."""
    quantized = "quantization_config" in json.loads((Path(path) / "config.json").read_text())
    return torch.float16 if quantized and device.type == "cuda" else torch.float32


def load_candidate(path: Path, device: torch.device, trust_remote_code: bool = False):
    """A merged or GPTQ checkpoint through plain transformers (GPTQ via its quantization_config)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=candidate_dtype(path, device), device_map={"": device}, trust_remote_code=trust_remote_code
    ).eval()


BASELINES = {
    "original": "merged into original 16-bit base (PEFT fp16, unsloth, LLaMA-Factory)",
    "base": "base without adapter (the fine-tune's own effect)",
}


def load_baseline(kind: str, base_dir: Path, adapter, device: torch.device, trust_remote_code: bool = False):
    """Context rows, built in memory: "original" adds the adapter to the original 16-bit weights (what
    most merge tools do); "base" is the base model without the adapter."""
    model = load_base(base_dir, None, device, "lora", trust_remote_code)  # a pre-quantized base has no "original" row
    if kind == "original":
        state = model.state_dict()  # shares storage with the parameters
        with torch.no_grad():
            for key, module in adapter.modules.items():
                state[key] += module.delta(device)
    return model.eval()


def _set_4bit_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype


@torch.inference_mode()
def evaluate(
    reference: torch.nn.Module,
    candidates: dict[str, torch.nn.Module],
    windows: torch.Tensor,
    training_compute_dtype: str,
    batch_size: int = 1,
    show_progress: bool = True,
    scored_bytes: int | None = None,
) -> dict[str, dict]:
    """Metrics of every candidate (and of the noise floor) against the reference.

    Scored positions: in each window of L tokens, the L−1 next-token predictions from the window's
    own prefix (no context carried across windows); standard errors are clustered by window."""
    device = next(reference.parameters()).device
    stats: dict[str, defaultdict[str, list]] = {}
    floor_dtype = torch_dtype(training_compute_dtype)
    clusters = []
    for start in tqdm(range(0, len(windows), batch_size), desc="drift", unit="batch", disable=None if show_progress else True, leave=False):
        ids = windows[start : start + batch_size].to(device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        clusters.append(torch.arange(start, start + len(ids)).repeat_interleave(targets.shape[1]))
        ref_lp = log_probs(reference(input_ids=inputs).logits)
        runs = dict(candidates)
        if floor_dtype != torch.float32:
            runs[NOISE_FLOOR] = None
        for name, model in runs.items():
            if model is None:
                _set_4bit_compute_dtype(reference, floor_dtype)
                logits = reference(input_ids=inputs).logits
                _set_4bit_compute_dtype(reference, torch.float32)
            else:
                logits = model(input_ids=inputs).logits
            s = token_stats(ref_lp, log_probs(logits), targets)
            acc = stats.setdefault(name, defaultdict(list))
            for field in ("nll_ref", "nll", "kld", "top1_same", "top5_same"):
                acc[field].append(getattr(s, field).cpu())
    cluster_ids = torch.cat(clusters)
    return {
        name: summarize(**{k: torch.cat(v) for k, v in acc.items()}, clusters=cluster_ids, scored_bytes=scored_bytes) for name, acc in stats.items()
    }
