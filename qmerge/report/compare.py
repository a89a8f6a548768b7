"""`qmerge compare A/report.json B/report.json …`: the candidates of several runs side by side, per
eval set, with each difference against the first report tested for significance.

Two runs scored on the same token stream (equal windows_sha256) are compared **paired**: the
difference is taken window by window from the reports' per-window sums, and its standard error is
clustered over windows, exactly as the metrics themselves are. That cancels what both runs share
(hard windows are hard for both) and detects far smaller differences than comparing two means whose
SEs are combined in quadrature, which is the **unpaired** test used when the token streams differ.

Rows are matched by their kind (report.json candidates[name]["kind"]: merged, gptq, rtn, ...), not
by display name, which carries settings ("gptq 4-bit g128" and "gptq 4-bit g64" are both the gptq
row); each row says which settings behind it differ from the first report's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from qmerge.errors import QmergeError
from qmerge.report.charts import PALETTE, Axis, Row, dot_plot
from qmerge.report.html import escape, figure, markdown_to_html, page
from qmerge.report.markdown import md_table
from qmerge.report.schema import SCHEMA_VERSION
Z_CRITICAL = 1.96  # two-sided 5%
SIGNIFICANCE = (
    f"significant (marked *) means |z| > {Z_CRITICAL} (two-sided 5% level; no correction for the number of "
    "comparisons). Paired: same token stream (equal windows_sha256), the difference taken per window and "
    "its SE clustered over windows. Unpaired: different token streams, SE = √(SE_A² + SE_B²)."
)
ROW_KEYS = ("kld_mean", "kld_mean_se", "ppl_ratio", "ln_ppl_ratio", "ln_ppl_ratio_se", "top1_agreement", "top1_agreement_se")
# metric: (mean key, SE key, per-window sums of it, how to print a difference)
STATS = {
    "kld_mean": ("kld_mean", "kld_mean_se", lambda w: w["kld"], lambda d: f"{d:+.2e}"),
    "ln_ppl_ratio": ("ln_ppl_ratio", "ln_ppl_ratio_se", lambda w: [a - b for a, b in zip(w["nll"], w["nll_ref"])], lambda d: f"{d:+.2e}"),
    "top1_agreement": ("top1_agreement", "top1_agreement_se", lambda w: w["top1_same"], lambda d: f"{100 * d:+.2f} pp"),
}


def load(path: Path) -> dict:
    """A report.json of schema 2, or a one-line QmergeError saying what is wrong with it."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QmergeError(f"{path}: no such file; pass the report.json files that qmerge run wrote") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QmergeError(f"{path}: not a readable JSON report ({e}); pass a report.json written by qmerge run") from None
    if not isinstance(report, dict) or "schema_version" not in report:
        raise QmergeError(f"{path}: not a qmerge report (no schema_version); pass a report.json written by qmerge run")
    if report["schema_version"] != SCHEMA_VERSION:
        raise QmergeError(f"{path}: report schema_version {report['schema_version']!r}, qmerge compare reads {SCHEMA_VERSION}; rerun qmerge run with this qmerge to get one")
    if not _complete(report):
        raise QmergeError(f"{path}: schema 2 report without the evaluations, candidates or metrics compare reads (damaged?); rerun qmerge run")
    return report


def _complete(report: dict) -> bool:
    evaluations = report.get("evaluations")
    return (
        isinstance(report.get("candidates"), dict) and isinstance(evaluations, list) and bool(evaluations)
        and all(isinstance(ev, dict) and {"eval", "windows", "windows_sha256"} <= ev.keys() and isinstance(ev.get("metrics"), dict) for ev in evaluations)
        and all(isinstance(m, dict) and set(ROW_KEYS) <= m.keys() for ev in evaluations for m in ev["metrics"].values())
    )


def compare(paths: list[Path]) -> dict:
    """Every candidate of every report, per eval set of the first report, with differences against it."""
    if len(paths) < 2:
        raise QmergeError("qmerge compare needs at least two report.json files (the first is the baseline)")
    reports = [load(p) for p in paths]
    labels = [chr(ord("A") + i) if i < 26 else f"R{i + 1}" for i in range(len(paths))]
    evals = [ev["eval"] for ev in reports[0]["evaluations"]]
    for path, rep in zip(paths[1:], reports[1:]):
        if not {ev["eval"] for ev in rep["evaluations"]} & set(evals):
            raise QmergeError(f"{path} shares no eval set with {paths[0]} (eval sets: {', '.join(map(str, evals))}); rerun it with --eval on the same text")
    return {
        "significance": SIGNIFICANCE,
        "z_critical": Z_CRITICAL,
        "reports": [{"label": label, "path": str(path)} for label, path in zip(labels, paths)],
        "evaluations": [compare_eval(name, reports, labels) for name in evals],
    }


def compare_eval(name: str, reports: list[dict], labels: list[str]) -> dict:
    """The rows of one eval set: every candidate of every report, grouped by kind (a GPTQ row of g128
    and one of g64 are both `gptq`), each compared with the first report's row of its kind."""
    evs = {label: next((ev for ev in rep["evaluations"] if ev["eval"] == name), None) for label, rep in zip(labels, reports)}
    base = evs[labels[0]]
    by_kind = {label: {kind_of(rep, cand): cand for cand in ev["metrics"]} if ev else {} for label, rep, ev in zip(labels, reports, evs.values())}
    kinds = list(dict.fromkeys(kind for label in labels for kind in by_kind[label]))
    rows = []
    for kind in kinds:
        first = by_kind[labels[0]].get(kind)
        for label, rep in zip(labels, reports):
            cand = by_kind[label].get(kind)
            if cand is None:
                continue
            m = evs[label]["metrics"][cand]
            row = {"candidate": cand, "kind": kind, "report": label, "size_bytes": rep["candidates"].get(cand, {}).get("size_bytes"), **{k: m[k] for k in ROW_KEYS}}
            if label != labels[0] and first is not None:
                row["vs"] = difference(base, evs[label], first, cand)
                row["settings_differ"] = settings_differ(reports[0], rep, kind)
            rows.append(row)
    streams = {label: (ev["windows_sha256"] == base["windows_sha256"]) if ev else None for label, ev in evs.items()}
    return {"eval": name, "same_token_stream": streams, "windows": {label: ev and ev["windows"] for label, ev in evs.items()}, "rows": rows}


def kind_of(report: dict, cand: str) -> str:
    """A row's kind (report.json candidates[name]["kind"]); the display name for a row without one."""
    return report["candidates"].get(cand, {}).get("kind", cand)


GRID_KINDS = ("rtn", "gptq", "gptq-original")  # rows on the GPTQ grid: its settings matter to them


def settings_differ(a: dict, b: dict, kind: str) -> list[str]:
    """The settings behind a row of `kind` that differ between two reports, as "name A → B"."""
    sections = [("nf4", a["settings"].get("nf4", {}), b["settings"].get("nf4", {}))]
    if kind in GRID_KINDS:
        sections.append(("gptq", a["settings"].get("gptq", {}), b["settings"].get("gptq", {})))
    out = [f"{key} {sa.get(key)} → {sb.get(key)}" for _, sa, sb in sections for key in sorted(set(sa) | set(sb)) if sa.get(key) != sb.get(key) and key != "group_size_auto"]
    if a["settings"].get("merged_dtype") != b["settings"].get("merged_dtype"):
        out.append(f"merged_dtype {a['settings'].get('merged_dtype')} → {b['settings'].get('merged_dtype')}")
    return out


def difference(a_ev: dict, b_ev: dict, a_cand: str, b_cand: str) -> dict:
    """B − A for one kind of candidate (its row `a_cand` in A, `b_cand` in B): paired on windows when the
    token streams are the same, else unpaired."""
    a, b = a_ev["metrics"][a_cand], b_ev["metrics"][b_cand]
    paired = a_ev["windows_sha256"] == b_ev["windows_sha256"] and _same_windows(a, b)
    out = {"test": "paired" if paired else "unpaired"}
    for stat, (mean, se, sums, _) in STATS.items():
        if paired:
            diff = [y - x for x, y in zip(sums(a["per_window"]), sums(b["per_window"]))]
            d, d_se = window_mean(diff, a["per_window"]["tokens"])
        else:
            d, d_se = b[mean] - a[mean], math.hypot(_number(a[se]), _number(b[se]))
        z = d / d_se if d_se > 0 else None  # NaN > 0 is False: no z for an undefined SE
        out[stat] = {"diff": d, "se": d_se, "z": z, "significant": z is not None and abs(z) > Z_CRITICAL}
    return out


def _number(value) -> float:
    """A report's number; null (an undefined standard error, such as that of one window) as NaN."""
    return float("nan") if value is None else value


def _same_windows(a: dict, b: dict) -> bool:
    return "per_window" in a and "per_window" in b and a["per_window"]["tokens"] == b["per_window"]["tokens"]


def window_mean(sums: list[float], tokens: list[int]) -> tuple[float, float]:
    """Mean per token of per-window sums, with its SE clustered by window (CR1, as metrics.clustered_mean):
    SE² = G/(G−1) · Σ_g (S_g − m·n_g)² / N²."""
    n, g = sum(tokens), len(tokens)
    m = sum(sums) / n
    if g < 2:
        return m, float("nan")
    return m, math.sqrt(g / (g - 1) * sum((s - m * t) ** 2 for s, t in zip(sums, tokens))) / n


# ----- output ---------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    refs = ", ".join(f"{r['label']} = `{r['path']}`" for r in result["reports"])
    parts = [f"# qmerge compare\n\nReports: {refs}. Differences are each report minus {result['reports'][0]['label']}; {result['significance']}\n"]
    for ev in result["evaluations"]:
        parts.append(f"## eval `{ev['eval']}`\n\n{_streams(ev)}\n\n{_table(ev)}")
    return "\n".join(parts)


def _streams(ev: dict) -> str:
    first, *others = ev["same_token_stream"]
    said = [f"{first}: {ev['windows'][first]} windows"]
    for label in others:
        same = ev["same_token_stream"][label]
        said.append(f"{label}: " + ("not in this report" if same is None else "the same token stream as " + first if same else "a different token stream (unpaired tests)"))
    return "; ".join(said) + "."


COLUMNS = ["candidate", "report", "size MB", "mean KLD ± SE", "PPL ratio", "top-1 agree ± SE", "Δ mean KLD (z)", "Δ ln PPL ratio (z)", "Δ top-1 (z)", "settings vs first", "test"]


def _table(ev: dict) -> str:
    rows = []
    for r in ev["rows"]:
        size = f"{r['size_bytes'] / 1e6:.1f}" if r["size_bytes"] else "-"
        vs = r.get("vs")
        deltas = [_delta(vs[stat], fmt) if vs else "-" for stat, (_, _, _, fmt) in STATS.items()]
        rows.append([
            r["candidate"], r["report"], size, f"{r['kld_mean']:.3e} ± {_se(r['kld_mean_se'], '.1e')}", f"{r['ppl_ratio']:.5f}",
            f"{100 * r['top1_agreement']:.2f}% ± {_se(r['top1_agreement_se'], '.2f', 100)}", *deltas,
            "; ".join(r.get("settings_differ") or []) or ("same" if vs else "-"), vs["test"] if vs else "-",
        ])
    return md_table(COLUMNS, rows)


def _se(value, fmt: str, scale: float = 1) -> str:
    return "n/a" if value is None else format(scale * value, fmt)


def _delta(d: dict, fmt) -> str:
    z = "n/a" if d["z"] is None else f"{d['z']:+.1f}"
    return f"{fmt(d['diff'])} ({z})" + (" *" if d["significant"] else "")


def html_page(result: dict) -> str:
    """The markdown as HTML, plus mean KLD ± SE of every candidate in every report, per eval set."""
    charts = []
    for ev in result["evaluations"]:
        colours = {r["label"]: PALETTE[i % len(PALETTE)] for i, r in enumerate(result["reports"])}
        rows = [Row(f"{r['candidate']} — {r['report']}", r["kld_mean"], r["kld_mean_se"] or 0.0, colours[r["report"]]) for r in ev["rows"]]
        axis = Axis.fit([v for r in rows for v in (r.value - r.se, r.value + r.se)], log=True)
        charts.append(figure(dot_plot(rows, axis, "mean KLD ± SE (log scale)"), f"Mean KLD ± SE per candidate and report, eval <code>{escape(str(ev['eval']))}</code>."))
    return page("qmerge compare", markdown_to_html(markdown(result)) + "\n" + "\n".join(charts))


def run(paths: list[Path], html_out: Path | None) -> dict:
    """Compare, and write the HTML page when asked (its folder checked before any work)."""
    if html_out is not None and not Path(html_out).resolve().parent.is_dir():
        raise QmergeError(f"--html {html_out}: its folder does not exist; create it or write the page elsewhere")
    result = compare(paths)
    if html_out is not None:
        Path(html_out).write_text(html_page(result))
    return result
