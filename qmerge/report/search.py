"""The drift-budget search in the report: its rows (markdown), its size-vs-KLD chart (html), the
verdict line of an exit 3, and which modules got what (model card). Plain data, no torch."""

from __future__ import annotations

from collections import Counter

from qmerge.report.charts import FRONTIER_COLOUR, PALETTE, Axis, Plot, pareto_frontier
from qmerge.report.markdown import md_table

CHOSEN_COLOUR = "#d62728"
BUDGET_COLOUR = "#2ca02c"


def verdict(search: dict) -> str:
    """One line: what the search chose and how far it is from the budget."""
    row = search["rows"][search["chosen"]]
    words = "meets" if search["met"] else f"is the best of {len(search['rows'])} tried and misses"
    return (f"search: {row['name']} ({row['size_bytes'] / 2**20:.2f} MiB, {row['bits_per_weight']:.3f} bits/weight), mean KLD {row['kld_mean']:.4g} ± {row['kld_mean_se']:.2g}, "
            f"{words} the budget {search['budget']:.4g} ({search['distance']:+.3g}, ×{row['kld_mean'] / search['budget']:.3g})")


def markdown(report: dict) -> str:
    """report.md's section: every configuration tried, the chosen one marked, and the ranking's head."""
    search = report.get("search")
    if not search:
        return ""
    plain = search["rows"][0]
    rows = [
        [("**→ " if r.get("chosen") else "") + r["name"] + ("**" if r.get("chosen") else ""), f"{r['size_bytes'] / 2**20:.3f}", f"{r['bits_per_weight']:.3f}",
         f"{r['bits_per_weight'] - plain['bits_per_weight']:+.3f}", f"{r['kld_mean']:.4g} ± {r['kld_mean_se']:.2g}", f"{r['kld_mean'] / plain['kld_mean']:.3f}",
         "yes" if r["ok"] else "no", f"{r['wall_s']:.1f}"]
        for r in search["rows"]
    ]
    table = md_table(["configuration", "MiB", "bits/weight", "Δ bits/weight", "mean KLD ± SE", "× plain", "≤ budget", "wall s"], rows)
    ranking = ""
    if search.get("ranking"):
        head = [[r["group"], f"{r['kld_drop']:.3g}", str(r["extra_bytes"])] for r in search["ranking"][:10]]
        ranking = "\nSensitivity (KLD drop on calibration windows when the group keeps its float weights, per extra byte of 8 bits), first 10:\n\n" + md_table(["group", "KLD drop", "extra bytes at 8-bit"], head)
    return f"""## Drift-budget search (`--max-kld {search['budget']:g} --search`, target {search['target']})

{verdict(search)}. Every configuration tried is a row (KLD on eval set `{report['evaluations'][0]['eval']}`,
where the budget is judged); DIR/gptq holds the chosen one (→), its per-module overrides in
`quantization_config.dynamic`. Search wall time {search['wall_s']:.1f} s.

{table}{ranking}
"""


def chart(search: dict) -> str:
    """Size against mean KLD ± SE of every configuration tried: the frontier dashed, the chosen ring red, the budget a green line."""
    rows = search["rows"]
    sizes = [r["size_bytes"] / 1e6 for r in rows]
    klds = [v for r in rows for v in (max(r["kld_mean"] - r["kld_mean_se"], r["kld_mean"] / 10), r["kld_mean"] + r["kld_mean_se"])] + [search["budget"]]
    plot = Plot(Axis.fit(sizes), Axis.fit(klds, log=True), "weights on disk (MB)", "mean KLD ± SE (log scale)")
    for i, (r, size) in enumerate(zip(rows, sizes)):
        colour = CHOSEN_COLOUR if r.get("chosen") else PALETTE[0]
        plot.ybar(size, max(r["kld_mean"] - r["kld_mean_se"], r["kld_mean"] / 10), r["kld_mean"] + r["kld_mean_se"], colour)
        title = f"{r['name']}: {size:.3f} MB, {r['bits_per_weight']:.3f} bits/weight, mean KLD {r['kld_mean']:.3e} ± {r['kld_mean_se']:.1e}"
        plot.point(size, r["kld_mean"], colour, title + (" (chosen)" if r.get("chosen") else ""), hollow=not r["ok"])
        plot.label(plot.px(size) + 8, plot.py(r["kld_mean"]) - 6, f"{i}" + (" chosen" if r.get("chosen") else ""))
        plot.legend.append((f"{i}: {r['name']}", colour, not r["ok"], None))
    plot.line([(min(sizes), search["budget"]), (max(sizes), search["budget"])], BUDGET_COLOUR, f"budget: mean KLD {search['budget']:g}", dash="2 3")
    plot.legend.append(("budget", BUDGET_COLOUR, False, "2 3"))
    frontier = pareto_frontier(list(zip(sizes, (r["kld_mean"] for r in rows))))
    if len(frontier) > 1:
        plot.line(frontier, FRONTIER_COLOUR, "Pareto frontier of the configurations tried", dash="6 4")
        plot.legend.append(("Pareto frontier", FRONTIER_COLOUR, False, "6 4"))
    return plot.svg("search")


def card(search: dict | None) -> str:
    """The model card's words on a mixed-precision checkpoint: which modules got what, and the loader that honours it."""
    if not search:
        return ""
    counts = Counter(search["modules"].values())
    special = [f"`{m}`: {s}" for m, s in search["modules"].items() if s != max(counts, key=counts.get)]
    listing = "\n".join(f"- {line}" for line in special) or "- none"
    return f"""## Per-module precision (drift-budget search)

Chosen by `qmerge run --max-kld {search['budget']:g} --search` (target {search['target']}): {verdict(search)}.
Modules by setting: {', '.join(f'{n} × {s}' for s, n in sorted(counts.items()))}. Those not at the most common setting:

{listing}

The overrides are GPTQModel's `dynamic` in `config.json`'s `quantization_config`: load with GPTQModel
(`GPTQModel.load(path)`), or serve with vLLM/SGLang (whose GPTQ Marlin path reads `dynamic`);
transformers' `from_pretrained` builds every layer at the top-level bits and refuses this checkpoint.
"""
