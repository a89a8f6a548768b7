"""Drift of each candidate from the reference, the QLoRA model as trained (base loaded in 4-bit by
bitsandbytes, adapter unmerged via PEFT), on one shared token stream.

Every model computes in float32, so the numbers measure weights rather than arithmetic. The
training-time compute dtype (bf16 by default) is measured separately as the noise floor: the same
reference with its 4-bit layers computing in that dtype (emulated in float32 where the device has no
native bf16, qmerge.models.precision).

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

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import torch

from qmerge.eval.finite import check_finite
from qmerge.eval.metrics import compare, kld_histogram, per_window, summarize
from qmerge.io.dtypes import torch_dtype
from qmerge.io.memory import release
from qmerge.io.progress import Progress
from qmerge.models.precision import computing_in

NOISE_FLOOR = "noise floor (reference @ training compute dtype)"


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
        check_finite(ref_out.logits, "the reference (QLoRA as trained)", start)
        for name, model in models.items():  # one model's outputs alive at a time: 100 MB of logits each for SmolLM2
            if model is None:
                with computing_in(reference, floor_dtype):  # emulated in float32 where the device lacks the dtype
                    out = reference(input_ids=inputs, output_hidden_states=True)
            else:
                out = model(input_ids=inputs, output_hidden_states=True)
            check_finite(out.logits, f"candidate {name!r}", start)
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
    with Progress(len(passes) * batches, "drift", "batch", enabled=None if show_progress else False) as bar:
        for names in passes:
            bar.note(", ".join(names))
            models = {name: None if name == NOISE_FLOOR else candidates[name]() for name in names}
            for tally in tallies:
                for start in range(0, len(tally.windows), batch_size):
                    tally.add(reference, models, start, batch_size, floor_dtype)
                    bar.update()
            del models
            release()  # the candidate's weights go before the next one is built
    order = [*candidates, *([NOISE_FLOOR] if floor_dtype != torch.float32 else [])]
    return [t.result(order) for t in tallies]
