"""Drift of each candidate from the reference, the QLoRA model as trained (base loaded in 4-bit by
bitsandbytes, adapter unmerged via PEFT), on one shared token stream.

Every model computes in float32, so the numbers measure weights rather than arithmetic. The
training-time compute dtype (bf16 by default) is measured separately as the noise floor: the same
reference with its 4-bit layers computing in that dtype.

Memory: candidates are built and scored one at a time, each against a fresh forward of the
reference, so only the reference (4-bit) and one candidate are ever resident; a float checkpoint
stays in its stored dtype and upcasts each weight as it is used (`float32_compute`). The price is
one reference forward per candidate instead of one in all; keeping every candidate resident instead
made the drift stage the peak of a run (4.2 GB of a 4.3 GB run for SmolLM2-135M with two
candidates, BENCHMARKS.md), and on a GPU would not fit a 7B model's float32 candidates side by side.
Full-vocabulary logits and hidden states exist for one batch only, and the metric math runs on
chunks of positions (`metrics.compare`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from qmerge.adapter import Mix, peft_model
from qmerge.edits import apply_to_model
from qmerge.metrics import compare, kld_histogram, per_window, summarize
from qmerge.nf4 import load_base, torch_dtype
from qmerge.rss import release
from qmerge.settings import NF4Settings

NOISE_FLOOR = "noise floor (reference @ training compute dtype)"


def load_reference(base_dir: Path, mix: Mix, nf4: NF4Settings, device: torch.device, trust_remote_code: bool = False, kind: str = "qlora"):
    """Base as the adapter saw it (qlora: quantized by bitsandbytes at load, or pre-quantized; lora:
    16-bit) + the adapters, unmerged: the model as trained."""
    return peft_model(load_base(base_dir, nf4, device, kind, trust_remote_code), mix).eval()


def peft_nf4(reference: torch.nn.Module) -> torch.nn.Module:
    """PEFT's own merge on the 4-bit model (merge_and_unload): dequantize, add the delta, and re-round
    the sum to NF4, a second rounding the adapter never saw. Made from a copy of the QLoRA reference
    (a "qlora" load_reference), which spares bitsandbytes quantizing the base once more."""
    import copy

    return copy.deepcopy(reference).merge_and_unload().eval()


def candidate_dtype(path: Path, device: torch.device) -> torch.dtype:
    """The dtype a candidate computes in: float32, except a quantized checkpoint on CUDA: GPTQModel
    picks Marlin there, which computes in float16 only (as servers run it)."""
    return torch.float16 if _quantized(path) and device.type == "cuda" else torch.float32


def load_candidate(path: Path, device: torch.device, trust_remote_code: bool = False):
    """A merged or GPTQ checkpoint through plain transformers (GPTQ via its quantization_config); a
    float checkpoint in its stored dtype, computing in float32 (see float32_compute)."""
    load = dict(device_map={"": device}, trust_remote_code=trust_remote_code)
    if _quantized(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=candidate_dtype(path, device), **load).eval()
    return float32_compute(AutoModelForCausalLM.from_pretrained(path, dtype="auto", **load)).eval()


def _quantized(path: Path) -> bool:
    return "quantization_config" in json.loads((Path(path) / "config.json").read_text())


class _Float32Linear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.float(), None if self.bias is None else self.bias.float())


class _Float32Embedding(torch.nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()  # rows looked up, then upcast: the same values as a float32 table


def float32_compute(model: torch.nn.Module) -> torch.nn.Module:
    """Compute in float32 while holding a 16-bit model's weights in 16 bits: every Linear upcasts its
    weight when it runs and every Embedding upcasts the rows it looks up, both exact, so the logits are
    bit-identical to a float32 copy's (tests/test_drift.py checks with torch.equal) at half its memory.
    The small tensors (norms, biases, buffers) become float32."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = _Float32Linear
        elif type(module) is torch.nn.Embedding:
            module.__class__ = _Float32Embedding
        big = {"weight"} if isinstance(module, (_Float32Linear, _Float32Embedding)) else set()
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and name not in big:
                param.data = param.data.float()
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point():
                module._buffers[name] = buf.float()  # in place of the entry: persistence unchanged
    return model


def load_baseline(kind: str, base_dir: Path, mix: Mix, device: torch.device, trust_remote_code: bool = False, store_dtype: str | None = None):
    """Built in memory: "original" adds the adapter to the original 16-bit weights (what most merge
    tools do), rounded to `store_dtype` as a merged checkpoint stores it; "base" is the base model
    without the adapter (context: how far the fine-tune itself moved the model)."""
    model = load_base(base_dir, None, device, "lora", trust_remote_code)  # a pre-quantized base has no "original" row
    if kind == "original":
        apply_to_model(model, mix, device)
        if store_dtype is not None:
            model = float32_compute(model.to(torch_dtype(store_dtype)))
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


Build = Callable[[], torch.nn.Module]


class Tally:
    """What one eval set has measured so far: per-token series and layer drift, per model."""

    def __init__(self, windows: torch.Tensor, scored_bytes: int | None = None) -> None:
        self.windows = windows
        self.scored_bytes = scored_bytes
        self.series: dict[str, defaultdict[str, list[torch.Tensor]]] = {}
        self.layers: dict[str, LayerDrift] = {}

    def add(self, reference: torch.nn.Module, models: dict[str, torch.nn.Module | None], start: int, batch_size: int, floor_dtype: torch.dtype) -> None:
        """Score windows [start, start + batch_size) of every model against one reference forward
        (a None model is the noise floor: the reference in the training compute dtype)."""
        device = next(reference.parameters()).device
        ids = self.windows[start : start + batch_size].to(device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        ref_out = reference(input_ids=inputs, output_hidden_states=True)
        for name, model in models.items():  # one model's outputs alive at a time: 100 MB of logits each for SmolLM2
            if model is None:
                _set_4bit_compute_dtype(reference, floor_dtype)
                out = reference(input_ids=inputs, output_hidden_states=True)
                _set_4bit_compute_dtype(reference, torch.float32)
            else:
                out = model(input_ids=inputs, output_hidden_states=True)
            self.layers.setdefault(name, LayerDrift()).add(ref_out.hidden_states, out.hidden_states)
            s = compare(ref_out.logits, out.logits, targets)
            del out
            acc = self.series.setdefault(name, defaultdict(list))
            for field in ("nll_ref", "nll", "kld", "top1_same", "top5_same"):
                acc[field].append(getattr(s, field).cpu())
        del ref_out
        release()  # glibc keeps the batch's freed activations otherwise, and a heap fragmented by earlier stages grew by 1 GB over 8 windows

    def result(self, order: list[str]) -> dict:
        """{"metrics": per model in `order`, every number against the reference, the per-token KLD
        histogram and per-window sums; "layers": per model, the hidden-state drift of each layer}."""
        clusters = torch.arange(len(self.windows)).repeat_interleave(self.windows.shape[1] - 1)
        metrics = {}
        for name in order:
            series = {k: torch.cat(v) for k, v in self.series[name].items()}
            metrics[name] = {
                **summarize(**series, clusters=clusters, scored_bytes=self.scored_bytes),
                "kld_hist": kld_histogram(series["kld"]),
                "per_window": per_window(clusters, nll=series["nll"], nll_ref=series["nll_ref"], kld=series["kld"], top1_same=series["top1_same"]),
            }
        return {"metrics": metrics, "layers": {name: self.layers[name].rows() for name in order}}


@torch.inference_mode()
def evaluate(
    reference: torch.nn.Module,
    candidates: Mapping[str, Build],
    windows: Sequence[torch.Tensor],
    training_compute_dtype: str,
    batch_size: int = 1,
    show_progress: bool = True,
    scored_bytes: Sequence[int | None] | None = None,
) -> list[dict]:
    """Per eval set (`windows`, one tensor of windows each): Tally.result of every candidate and
    the noise floor against the reference.

    Each candidate is built when its turn comes, scored on every eval set, and released before the
    next is built; the noise floor rides along with the first. Scored positions: in each window of L
    tokens, the L−1 next-token predictions from the window's own prefix (no context carried across
    windows); standard errors are clustered by window."""
    floor_dtype = torch_dtype(training_compute_dtype)
    tallies = [Tally(w, b) for w, b in zip(windows, scored_bytes or [None] * len(windows))]
    passes = [[name] for name in candidates] or [[]]
    if floor_dtype != torch.float32:
        passes[0].append(NOISE_FLOOR)
    batches = sum(-(-len(t.windows) // batch_size) for t in tallies)
    with tqdm(total=len(passes) * batches, desc="drift", unit="batch", disable=None if show_progress else True, leave=False) as bar:
        for names in passes:
            models = {name: None if name == NOISE_FLOOR else candidates[name]() for name in names}
            for tally in tallies:
                for start in range(0, len(tally.windows), batch_size):
                    tally.add(reference, models, start, batch_size, floor_dtype)
                    bar.update()
            del models
            release()  # the candidate's weights go before the next one is built
    order = [*candidates, *([NOISE_FLOOR] if floor_dtype != torch.float32 else [])]
    return [t.result(order) for t in tallies]
