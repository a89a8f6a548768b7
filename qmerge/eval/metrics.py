"""Pure metric math, following llama.cpp's perplexity tool: per-token statistics of a candidate
against the reference (reference as P in the KL divergence), then means with standard errors.

Tokens within one window share context, so they are not independent: every standard error here is
clustered by window (the sum over windows of squared deviations of window totals, with the G/(G-1)
small-sample factor), which is wider and honest where a per-token SE would be too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields

import torch

from qmerge.io.memory import trim


@dataclass(frozen=True)
class TokenStats:
    """Per scored position, flattened over a batch of windows."""

    nll_ref: torch.Tensor
    nll: torch.Tensor
    kld: torch.Tensor
    top1_same: torch.Tensor  # bool
    top5_same: torch.Tensor  # bool: the same set of five most likely tokens, in any order


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax in float64, so that KL values near 1e-7 are not rounding noise."""
    return torch.log_softmax(logits.double(), dim=-1)


@dataclass(frozen=True)
class ReferenceStats:
    """The reference's side of `token_stats` for a span of positions: its log-probabilities, target
    NLL, argmax and top-5, the same for any candidate compared with it (computed once per span for
    every candidate: `compare`). The KL weights exp(lp) are not kept: as large as lp in float64, they
    cost one exp per candidate to recompute."""

    lp: torch.Tensor  # (B, T, V) log-probabilities
    nll: torch.Tensor  # of the targets, flattened
    top1: torch.Tensor  # (B, T)
    top5: torch.Tensor  # (B, T, 5), sorted token ids
    idx: torch.Tensor  # the targets as (B, T, 1) gather indices


def reference_stats(ref_lp: torch.Tensor, targets: torch.Tensor) -> ReferenceStats:
    """Reference log-probabilities (B, T, V) predicting `targets` (B, T)."""
    idx = targets.unsqueeze(-1)
    return ReferenceStats(
        lp=ref_lp,
        nll=-ref_lp.gather(-1, idx).squeeze(-1).flatten(),
        top1=ref_lp.argmax(-1),
        top5=_top5(ref_lp),
        idx=idx,
    )


def token_stats(ref: ReferenceStats, lp: torch.Tensor) -> TokenStats:
    """A candidate's log-probabilities (B, T, V) against the reference's statistics."""
    kld = (ref.lp.exp() * (ref.lp - lp)).sum(-1).clamp_min(0.0)
    return TokenStats(
        nll_ref=ref.nll,
        nll=-lp.gather(-1, ref.idx).squeeze(-1).flatten(),
        kld=kld.flatten(),
        top1_same=(ref.top1 == lp.argmax(-1)).flatten(),
        top5_same=(ref.top5 == _top5(lp)).all(-1).flatten(),
    )


Projection = Callable[[torch.Tensor], torch.Tensor]  # a model's head: hidden states (1, P, H) → float32 logits (1, P, V)
POSITIONS = 64  # per chunk of metric math: (64, V) float64 temporaries, 25 MB at a 49k vocabulary


def spans(batch: int, length: int, positions: int = POSITIONS) -> Iterator[tuple[int, slice]]:
    """(window in the batch, span of positions): the chunks metric math runs on, in (B, T) order."""
    for b in range(batch):
        for start in range(0, length, positions):
            yield b, slice(start, start + positions)


def chunk_stats(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> TokenStats:
    """token_stats of one chunk of positions: logits (1, P, V) of the reference and a candidate."""
    return token_stats(reference_stats(log_probs(ref_logits), targets), log_probs(logits))


def concat(parts: list[TokenStats]) -> TokenStats:
    return TokenStats(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(TokenStats)})


HEAD_BYTES = 64 * 2**20  # float32 logits of one model per head projection (compare's spans)


def head_positions(vocab: int) -> int:
    """Positions per head projection in `compare`: as many whole metric chunks as HEAD_BYTES of
    float32 logits hold (a 16-bit head upcasts its weight at each projection: fewer, longer spans
    cost less)."""
    return max(POSITIONS, HEAD_BYTES // (4 * vocab) // POSITIONS * POSITIONS)


def compare(ref_project: Projection, ref_hidden: torch.Tensor, candidates: Mapping[str, tuple[Projection, torch.Tensor]], targets: torch.Tensor, vocab: int) -> dict[str, TokenStats]:
    """token_stats of each candidate against the reference for a batch of windows, flattened in (B, T)
    order, from final hidden states (B, T, H) and heads (`*project`: a span of hidden states →
    float32 logits); `candidates`: name → (its head, its final hidden states). The reference's side
    (its logits, log-probabilities, targets' NLL, top-k) is computed once per span for all of them.
    Logits exist for one span of head_positions(vocab) positions of one model at a time, and the
    metric math runs on chunks of POSITIONS: whole, one 512-token window of a 49k vocabulary would
    make five 200 MB float64 tensors; chunked, a few MB whatever the length."""
    parts: dict[str, list[TokenStats]] = {name: [] for name in candidates}
    for b, span in spans(*targets.shape, head_positions(vocab)):
        ref_logits = ref_project(ref_hidden[b : b + 1, span])
        t = targets[b : b + 1, span].to(ref_logits.device)
        chunks = [c for _, c in spans(1, t.shape[1])]
        ref_lp = torch.empty(ref_logits.shape, dtype=torch.float64, device=ref_logits.device)  # one allocation, not one per chunk held across the candidates
        for c in chunks:
            ref_lp[:, c] = log_probs(ref_logits[:, c])
        del ref_logits
        refs = [reference_stats(ref_lp[:, c], t[:, c]) for c in chunks]
        for name, (project, hidden) in candidates.items():
            logits = project(hidden[b : b + 1, span]).to(ref_lp.device)  # a head elsewhere (spread over GPUs) is compared where the reference's is
            parts[name] += [token_stats(ref, log_probs(logits[:, c])) for ref, c in zip(refs, chunks)]
            del logits
            trim()  # the span's freed float64 chunks, before the next candidate's: without it glibc's heap grew 0.5-1 GB over a window
    return {name: concat(p) for name, p in parts.items()}


def _top5(lp: torch.Tensor) -> torch.Tensor:
    k = min(5, lp.shape[-1])
    return lp.topk(k, dim=-1).indices.sort(dim=-1).values


def clustered_mean(values: torch.Tensor, clusters: torch.Tensor) -> tuple[float, float]:
    """Mean of `values` and its standard error with observations clustered by `clusters`
    (the CR1 sandwich estimator for a mean): SE² = G/(G−1) · Σ_g (S_g − m·n_g)² / N²."""
    v = values.double().flatten()
    c = clusters.flatten()
    n = v.numel()
    mean = v.mean().item()
    _, inv = torch.unique(c, return_inverse=True)
    g = int(inv.max().item()) + 1
    if g < 2:
        return mean, float("nan")
    sums = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, v)
    counts = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, torch.ones_like(v))
    var = (g / (g - 1)) * ((sums - mean * counts) ** 2).sum().item() / n**2
    return mean, math.sqrt(var)


def perplexity(nll: torch.Tensor, clusters: torch.Tensor) -> tuple[float, float]:
    """exp(mean NLL) and its SE by the delta method."""
    m, se = clustered_mean(nll, clusters)
    return math.exp(m), math.exp(m) * se


def quantile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile (numpy's default), exact on any size."""
    v = values.double().flatten().sort().values
    pos = q * (v.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, v.numel() - 1)
    return (v[lo] + (v[hi] - v[lo]) * (pos - lo)).item()


def summarize(
    nll_ref: torch.Tensor,
    nll: torch.Tensor,
    kld: torch.Tensor,
    top1_same: torch.Tensor,
    top5_same: torch.Tensor,
    clusters: torch.Tensor,
    scored_bytes: int | None = None,
) -> dict:
    """Every number of one candidate against the reference, with clustered SEs.

    Δp = p(actual token) − p_ref(actual token), as llama.cpp reports it; bits per byte =
    Σ NLL / ln 2 / UTF-8 bytes of the scored text, comparable across tokenizers."""
    ppl, ppl_se = perplexity(nll, clusters)
    ppl_ref, ppl_ref_se = perplexity(nll_ref, clusters)
    ln_ratio, ln_ratio_se = clustered_mean(nll - nll_ref, clusters)  # paired: same tokens
    kld_mean, kld_se = clustered_mean(kld, clusters)
    top1, top1_se = clustered_mean(top1_same.double(), clusters)
    top5, top5_se = clustered_mean(top5_same.double(), clusters)
    dp = torch.exp(-nll.double()) - torch.exp(-nll_ref.double())
    dp_mean, dp_se = clustered_mean(dp, clusters)
    bpb = {}
    if scored_bytes:
        bpb = {"bits_per_byte": nll.double().sum().item() / math.log(2) / scored_bytes, "bits_per_byte_ref": nll_ref.double().sum().item() / math.log(2) / scored_bytes}
    return {
        "tokens": int(nll.numel()),
        "windows": int(torch.unique(clusters).numel()),
        "ppl": ppl,
        "ppl_se": ppl_se,
        "ppl_ref": ppl_ref,
        "ppl_ref_se": ppl_ref_se,
        "ppl_ratio": math.exp(ln_ratio),
        "ln_ppl_ratio": ln_ratio,
        "ln_ppl_ratio_se": ln_ratio_se,
        "kld_mean": kld_mean,
        "kld_mean_se": kld_se,
        "kld_median": quantile(kld, 0.5),
        "kld_p90": quantile(kld, 0.9),
        "kld_p99": quantile(kld, 0.99),
        "kld_p999": quantile(kld, 0.999),
        "kld_max": kld.max().item(),
        "top1_agreement": top1,
        "top1_agreement_se": top1_se,
        "top5_agreement": top5,
        "top5_agreement_se": top5_se,
        "delta_p_mean": dp_mean,
        "delta_p_mean_se": dp_se,
        "delta_p_rms": dp.pow(2).mean().sqrt().item(),
        **{f"delta_p_p{q}": quantile(dp, q / 100) for q in (1, 5, 95, 99)},
        "nll_correlation": torch.corrcoef(torch.stack([nll.double(), nll_ref.double()]))[0, 1].item(),
        **bpb,
    }


KLD_HIST_EDGES = torch.logspace(-8, 2, 51, dtype=torch.float64)  # 5 bins per decade, 1e-8 .. 1e2


def kld_histogram(kld: torch.Tensor) -> dict:
    """Counts of per-token KLD in log-spaced bins; values outside [1e-8, 1e2] (exact zeros included)
    are counted in the first or last bin, so the counts sum to the number of tokens."""
    inner = KLD_HIST_EDGES[1:-1]
    bins = torch.bucketize(kld.double().flatten(), inner, right=True)
    counts = torch.bincount(bins, minlength=len(KLD_HIST_EDGES) - 1)
    return {"edges": KLD_HIST_EDGES.tolist(), "counts": counts.tolist()}


def per_window(clusters: torch.Tensor, **values: torch.Tensor) -> dict[str, list]:
    """Per-window sums of each per-token series (and the token count per window), in window order:
    enough to recompute every mean, or to pair two reports window by window."""
    ids, inv = torch.unique(clusters, return_inverse=True)
    out = {"tokens": torch.bincount(inv, minlength=len(ids)).tolist()}
    for name, v in values.items():
        out[name] = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inv, v.double().flatten()).tolist()
    return out
