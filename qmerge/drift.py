"""Drift of each candidate from the reference, the QLoRA model as trained (base loaded in 4-bit by
bitsandbytes, adapter unmerged via PEFT), on one shared token stream.

Every model computes in float32, so the numbers measure weights rather than arithmetic. The
training-time compute dtype (bf16 by default) is measured separately as the noise floor: the same
reference with its 4-bit layers computing in that dtype. Reference and candidates run window batch
by window batch, so full-vocabulary logits and hidden states exist for one batch only (never for the
whole eval set); the price is that all models are resident at once (evaluating them one at a time
would mean running the reference once per candidate, or keeping an approximation of its outputs).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from qmerge.adapter import Mix, peft_model
from qmerge.edits import apply_to_model
from qmerge.metrics import kld_histogram, log_probs, per_window, reference_stats, summarize, token_stats
from qmerge.nf4 import load_base, torch_dtype
from qmerge.settings import NF4Settings

NOISE_FLOOR = "noise floor (reference @ training compute dtype)"


def load_reference(base_dir: Path, mix: Mix, nf4: NF4Settings, device: torch.device, trust_remote_code: bool = False, kind: str = "qlora"):
    """Base as the adapter saw it (qlora: quantized by bitsandbytes at load, or pre-quantized; lora:
    16-bit) + the adapters, unmerged: the model as trained."""
    return peft_model(load_base(base_dir, nf4, device, kind, trust_remote_code), mix).eval()


def load_peft_nf4(base_dir: Path, mix: Mix, nf4: NF4Settings, device: torch.device, trust_remote_code: bool = False):
    """PEFT's own merge on the 4-bit model (merge_and_unload): dequantize, add the delta, and re-round
    the sum to NF4, a second rounding the adapter never saw."""
    return load_reference(base_dir, mix, nf4, device, trust_remote_code).merge_and_unload().eval()


def candidate_dtype(path: Path, device: torch.device) -> torch.dtype:
    """float32, except a quantized checkpoint on CUDA: GPTQModel picks Marlin there, which computes
    in float16 only (as servers run it)."""
    quantized = "quantization_config" in json.loads((Path(path) / "config.json").read_text())
    return torch.float16 if quantized and device.type == "cuda" else torch.float32


def load_candidate(path: Path, device: torch.device, trust_remote_code: bool = False):
    """A merged or GPTQ checkpoint through plain transformers (GPTQ via its quantization_config)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=candidate_dtype(path, device), device_map={"": device}, trust_remote_code=trust_remote_code
    ).eval()


def load_baseline(kind: str, base_dir: Path, mix: Mix, device: torch.device, trust_remote_code: bool = False, store_dtype: str | None = None):
    """Built in memory: "original" adds the adapter to the original 16-bit weights (what most merge
    tools do), rounded to `store_dtype` as a merged checkpoint stores it; "base" is the base model
    without the adapter (context: how far the fine-tune itself moved the model)."""
    model = load_base(base_dir, None, device, "lora", trust_remote_code)  # a pre-quantized base has no "original" row
    if kind == "original":
        apply_to_model(model, mix, device)
        if store_dtype is not None:
            model = model.to(torch_dtype(store_dtype)).float()
    return model.eval()


def _set_4bit_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype


class LayerDrift:
    """Per decoder layer, summed over tokens: ‖h − h_ref‖², ‖h_ref‖² and the cosine of h with h_ref,
    so the relative Frobenius error and the mean per-token cosine come out over the whole eval set."""

    def __init__(self) -> None:
        self.diff: list[float] = []
        self.ref: list[float] = []
        self.cos: list[float] = []
        self.tokens = 0

    def add(self, ref_hidden: tuple[torch.Tensor, ...], hidden: tuple[torch.Tensor, ...]) -> None:
        """Hidden states as transformers returns them (embeddings first, then one per decoder layer,
        the last one after the final norm)."""
        if not self.diff:
            self.diff, self.ref, self.cos = ([0.0] * (len(ref_hidden) - 1) for _ in range(3))
        for i, (r, h) in enumerate(zip(ref_hidden[1:], hidden[1:])):
            r, h = r.double(), h.double()
            self.diff[i] += (h - r).pow(2).sum().item()
            self.ref[i] += r.pow(2).sum().item()
            self.cos[i] += torch.nn.functional.cosine_similarity(h, r, dim=-1).sum().item()
        self.tokens += ref_hidden[0].shape[0] * ref_hidden[0].shape[1]

    def rows(self) -> list[dict]:
        return [
            {"layer": i, "rel_error": (d / r) ** 0.5 if r else float("nan"), "cosine": c / self.tokens}
            for i, (d, r, c) in enumerate(zip(self.diff, self.ref, self.cos))
        ]


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
    """{"metrics": per candidate (and the noise floor): every number against the reference, the
    per-token KLD histogram and per-window sums; "layers": per candidate, the hidden-state drift of
    each decoder layer}.

    Scored positions: in each window of L tokens, the L−1 next-token predictions from the window's
    own prefix (no context carried across windows); standard errors are clustered by window."""
    device = next(reference.parameters()).device
    stats: dict[str, defaultdict[str, list]] = {}
    layers: dict[str, LayerDrift] = {}
    floor_dtype = torch_dtype(training_compute_dtype)
    clusters = []
    for start in tqdm(range(0, len(windows), batch_size), desc="drift", unit="batch", disable=None if show_progress else True, leave=False):
        ids = windows[start : start + batch_size].to(device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        clusters.append(torch.arange(start, start + len(ids)).repeat_interleave(targets.shape[1]))
        ref_out = reference(input_ids=inputs, output_hidden_states=True)
        ref = reference_stats(log_probs(ref_out.logits), targets)
        runs = dict(candidates)
        if floor_dtype != torch.float32:
            runs[NOISE_FLOOR] = None
        for name, model in runs.items():
            if model is None:
                _set_4bit_compute_dtype(reference, floor_dtype)
                out = reference(input_ids=inputs, output_hidden_states=True)
                _set_4bit_compute_dtype(reference, torch.float32)
            else:
                out = model(input_ids=inputs, output_hidden_states=True)
            s = token_stats(ref, log_probs(out.logits))
            acc = stats.setdefault(name, defaultdict(list))
            for field in ("nll_ref", "nll", "kld", "top1_same", "top5_same"):
                acc[field].append(getattr(s, field).cpu())
            layers.setdefault(name, LayerDrift()).add(ref_out.hidden_states, out.hidden_states)
            del out
    cluster_ids = torch.cat(clusters)
    metrics = {}
    for name, acc in stats.items():
        series = {k: torch.cat(v) for k, v in acc.items()}
        metrics[name] = {
            **summarize(**series, clusters=cluster_ids, scored_bytes=scored_bytes),
            "kld_hist": kld_histogram(series["kld"]),
            "per_window": per_window(cluster_ids, nll=series["nll"], nll_ref=series["nll_ref"], kld=series["kld"], top1_same=series["top1_same"]),
        }
    return {"metrics": metrics, "layers": {name: drift.rows() for name, drift in layers.items()}}
