"""Metric math against hand-computed values and a brute-force cluster bootstrap."""

from __future__ import annotations

import math

import pytest
import torch

from qmerge.eval.metrics import clustered_mean, compare, log_probs, quantile, reference_stats, summarize, token_stats


def test_token_stats_hand_computed():
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).log()
    q = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64).log()
    s = token_stats(reference_stats(log_probs(p.view(1, 1, 3)), torch.tensor([[0]])), log_probs(q.view(1, 1, 3)))
    assert math.isclose(s.kld.item(), 0.25 * math.log(2), rel_tol=1e-12)  # .5·ln2 + .25·ln(.5)
    assert math.isclose(s.nll_ref.item(), math.log(2), rel_tol=1e-12)
    assert math.isclose(s.nll.item(), math.log(4), rel_tol=1e-12)
    assert not s.top1_same.item() and s.top5_same.item()  # three tokens: the same top-5 set
    same = token_stats(reference_stats(log_probs(p.view(1, 1, 3)), torch.tensor([[1]])), log_probs((p + 3.0).view(1, 1, 3)))  # shift-invariant
    wide = torch.arange(8, dtype=torch.float64).view(1, 1, 8)
    swapped = wide.clone()
    swapped[..., [2, 3]] = swapped[..., [3, 2]]  # 2 leaves the top five, 3 joins it
    assert not token_stats(reference_stats(log_probs(wide), torch.tensor([[0]])), log_probs(swapped)).top5_same.item()
    assert same.kld.item() < 1e-15 and same.top1_same.item()



def test_token_stats_with_shared_reference_is_bit_identical_to_the_per_candidate_formula():
    """The reference's statistics are computed once per batch and shared by every candidate: each
    candidate's numbers must equal, bit for bit (tolerance 0), the formula that recomputed them per
    candidate, written out here as it was."""
    g = torch.Generator().manual_seed(3)
    ref_lp = log_probs(torch.randn(2, 7, 300, generator=g) * 3)
    targets = torch.randint(0, 300, (2, 7), generator=g)
    ref = reference_stats(ref_lp, targets)
    for _ in range(3):
        lp = log_probs(ref_lp + torch.randn(ref_lp.shape, generator=g, dtype=torch.float64) * 0.3)
        s = token_stats(ref, lp)
        idx = targets.unsqueeze(-1)
        top5 = lambda x: x.topk(5, dim=-1).indices.sort(dim=-1).values  # noqa: E731
        expected = {
            "nll_ref": -ref_lp.gather(-1, idx).squeeze(-1).flatten(),
            "nll": -lp.gather(-1, idx).squeeze(-1).flatten(),
            "kld": (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0.0).flatten(),
            "top1_same": (ref_lp.argmax(-1) == lp.argmax(-1)).flatten(),
            "top5_same": (top5(ref_lp) == top5(lp)).all(-1).flatten(),
        }
        for field, want in expected.items():
            assert torch.equal(getattr(s, field), want), field
        assert 0 < s.top1_same.sum() < s.top1_same.numel() and s.kld.min() > 0  # the comparisons are not vacuous

@pytest.mark.parametrize("head_bytes", [64 * 2**20, 4 * 500 * 64])  # one span per window; spans of 64 positions
def test_compare_in_chunks_equals_the_whole_batch_at_once(head_bytes, monkeypatch):
    """metrics.compare projects spans of positions and runs the metric math on 64 positions at a time
    to bound memory, the reference's side once for several candidates; each candidate's per-token
    series, in (B, T) order, equal token_stats of the whole batch (float32 logits, as models return
    them) and do not depend on which other candidates share the pass. The "heads" here are the
    identity on the logits, and a head that scales them (a candidate with its own head)."""
    from qmerge.eval import metrics

    monkeypatch.setattr(metrics, "HEAD_BYTES", head_bytes)
    vocab = 500
    g = torch.Generator().manual_seed(4)
    ref_logits = torch.randn(2, 150, vocab, generator=g) * 3
    logits = {name: ref_logits + torch.randn(ref_logits.shape, generator=g) * noise for name, noise in (("a", 0.3), ("b", 1.0))}
    targets = torch.randint(0, vocab, (2, 150), generator=g)
    identity, doubled = (lambda x: x), (lambda x: 2 * x)  # noqa: E731
    heads = {"a": identity, "b": doubled}
    together = compare(identity, ref_logits, {name: (heads[name], x) for name, x in logits.items()}, targets, vocab)
    for name, x in logits.items():
        whole = token_stats(reference_stats(log_probs(ref_logits), targets), log_probs(heads[name](x)))
        alone = compare(identity, ref_logits, {name: (heads[name], x)}, targets, vocab)[name]
        for field in ("nll_ref", "nll", "kld", "top1_same", "top5_same"):
            assert torch.equal(getattr(together[name], field), getattr(alone, field)), (name, field)
            assert torch.allclose(getattr(together[name], field).double(), getattr(whole, field).double(), rtol=1e-12, atol=0), (name, field)


def test_summarize_hand_computed():
    nll_ref = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    nll = nll_ref + torch.tensor([0.1, 0.1, 0.3, 0.3], dtype=torch.float64)
    clusters = torch.tensor([0, 0, 1, 1])
    m = summarize(
        nll_ref, nll, torch.tensor([0.0, 0.1, 0.2, 0.3], dtype=torch.float64), torch.tensor([True, True, False, True]),
        torch.tensor([True, False, False, True]), clusters, scored_bytes=10,
    )
    assert math.isclose(m["ppl_ref"], math.exp(2.5), rel_tol=1e-12)
    assert math.isclose(m["ppl_ratio"], math.exp(0.2), rel_tol=1e-12)
    # cluster totals of the paired difference: 0.2 and 0.6, mean 0.2/token, n_g = 2:
    # SE² = 2/1 · ((0.2−0.4)² + (0.6−0.4)²) / 4² = 0.01
    assert math.isclose(m["ln_ppl_ratio_se"], 0.1, rel_tol=1e-9)
    assert math.isclose(m["kld_mean"], 0.15, rel_tol=1e-12) and math.isclose(m["kld_max"], 0.3)
    assert m["top1_agreement"] == 0.75 and m["top5_agreement"] == 0.5 and (m["tokens"], m["windows"]) == (4, 2)
    dp = [math.exp(-(a + d)) - math.exp(-a) for a, d in ((1, 0.1), (2, 0.1), (3, 0.3), (4, 0.3))]
    assert math.isclose(m["delta_p_mean"], sum(dp) / 4, rel_tol=1e-12)
    assert math.isclose(m["delta_p_rms"], math.sqrt(sum(x * x for x in dp) / 4), rel_tol=1e-12)
    assert math.isclose(m["bits_per_byte"], sum(nll.tolist()) / math.log(2) / 10, rel_tol=1e-12)
    assert math.isclose(m["bits_per_byte_ref"], 10 / math.log(2) / 10, rel_tol=1e-12)
    assert 0.9 < m["nll_correlation"] <= 1.0  # nll = nll_ref + small shifts: strongly correlated


def test_clustered_se_matches_cluster_bootstrap():
    g = torch.Generator().manual_seed(0)
    n_clusters, per = 150, 40
    effects = torch.randn(n_clusters, generator=g).repeat_interleave(per)
    values = effects + 0.5 * torch.randn(n_clusters * per, generator=g)
    clusters = torch.arange(n_clusters).repeat_interleave(per)
    _, se = clustered_mean(values, clusters)
    grid = values.view(n_clusters, per)
    boot = torch.stack([grid[torch.randint(0, n_clusters, (n_clusters,), generator=g)].mean() for _ in range(3000)])
    assert abs(se / boot.std().item() - 1) < 0.1, (se, boot.std().item())
    naive = values.std().item() / math.sqrt(values.numel())
    assert se > 3 * naive  # tokens in a window are correlated: the per-token SE would be far too small


def test_quantile_matches_torch():
    v = torch.randn(1001, generator=torch.Generator().manual_seed(1))
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert math.isclose(quantile(v, q), torch.quantile(v.double(), q).item(), rel_tol=1e-12, abs_tol=1e-15)
