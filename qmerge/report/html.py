"""report.html: the report as one self-contained page (inline CSS and SVG, no script, no network),
with the charts a table hides: the KLD distribution, drift per layer, size against mean KLD, PPL with
its error bars, and GPTQ's per-module losses.

The text and tables are report.md converted here, so the two files never disagree (the side-by-side
completions, model output that markdown must not interpret, come from the same report data through
qmerge.report.samples, which writes both renderings); the charts are
SVG drawn in Python, so the page opens anywhere (an air-gapped review machine included) and carries
no code. Every string taken from a report (names, paths) is user input and is escaped. The page is
well-formed XML as well as HTML, which is what the tests parse.
"""

from __future__ import annotations

import re
from html import escape

from qmerge.report.charts import (
    PALETTE, REFERENCE_COLOUR, Axis, Row, dot_plot, gptq_loss_chart, is_context, kld_hist_chart, layer_chart, pareto_chart,
)
from qmerge.report import samples, search
from qmerge.report.markdown import markdown

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1280px;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:13px;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left;white-space:normal;min-width:14em}
th{background:#f3f3f3}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:90%;background:#f6f6f6}
pre{padding:.6em;overflow-x:auto}
figure{margin:1.5em 0}
figcaption{font-size:13px;color:#444;max-width:860px}
svg{display:block}
svg text{font-family:system-ui,sans-serif;fill:#222}
table.samples th{text-align:left}
table.samples td.text{white-space:pre-wrap;text-align:left;min-width:32em;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
pre.prompt{white-space:pre-wrap}
mark{background:#ffd54f}
.after{color:#777}
"""
# No request of any kind: a report that tried to load something would fail loudly in the browser.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def render(report: dict) -> str:
    """The whole report page: report.md's text and tables, the side-by-side completions, then the
    charts of each eval set (a part the report lacks, such as layers or a GPTQ log, leaves its chart out)."""
    body = markdown_to_html(markdown(report) + search.markdown(report)) + samples.html(report)
    colours = candidate_colours(report)
    charts = [evaluation_charts(report, ev, colours) for ev in report.get("evaluations", [])]
    if report.get("search"):
        charts.insert(0, figure(search.chart(report["search"]), "Drift-budget search: weights on disk against mean KLD ± SE of every configuration tried (numbered as in its table; hollow: above the budget), the chosen one red, the budget dotted green, the Pareto frontier of the tried configurations dashed."))
    if report.get("gptq_log"):
        charts.append(figure(gptq_loss_chart(report["gptq_log"]), "GPTQModel's loss per quantized module (log scale), by layer: where GPTQ found the weights hardest to round."))
    if any(charts):
        body += "<h2>Charts</h2>\n" + "\n".join(charts)
    return page("qmerge report", body)


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/>'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}"/>'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>" if svg else ""


def candidate_colours(report: dict) -> dict[str, str]:
    names = list(report.get("candidates", {}))
    for ev in report.get("evaluations", []):
        names += [n for n in ev.get("metrics", {}) if n not in names]
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def evaluation_charts(report: dict, ev: dict, colours: dict[str, str]) -> str:
    metrics = ev.get("metrics", {})
    candidates = report.get("candidates", {})
    what = f"eval <code>{escape(str(ev['eval']))}</code>"
    reference = report.get("reference", {}).get("name", "reference")
    rows = [Row(reference, m["ppl_ref"], m["ppl_ref_se"], REFERENCE_COLOUR) for m in list(metrics.values())[:1]]
    rows += [Row(name, m["ppl"], m["ppl_se"], colours[name], hollow=is_context(candidates, name)) for name, m in metrics.items()]
    parts = [
        f"<h3>{what}</h3>",
        figure(kld_hist_chart(metrics, colours), f"Distribution of the per-token KL divergence KL(reference ‖ model), {what}: fraction of scored tokens per log-spaced bin (the first and last bins also hold the values beyond them)."),
        figure(pareto_chart(candidates, metrics, colours), f"Weights on disk against mean KLD ± SE, {what}. Filled: deployable checkpoints, the dashed line joining those no other deployable one beats on both size and KLD (the Pareto frontier); hollow: context rows."),
        figure(dot_plot(rows, Axis.fit([v for r in rows for v in (r.value - r.se, r.value + r.se)]), "perplexity"), f"Perplexity ± SE (clustered by window), {what}. The bars share most of their uncertainty (the same tokens): the paired PPL ratio in the table is the sharper comparison."),
    ]
    if ev.get("layers"):
        parts.append(figure(layer_chart(ev["layers"], colours), f"Relative error of each layer's hidden states against the reference (log scale), {what}."))
    return "\n".join(parts)


# ----- markdown (report.md) to HTML: exactly the constructs report.md uses ---------------------------


def markdown_to_html(md: str) -> str:
    """Headings, paragraphs, pipe tables, bullet lists, fenced code and `code`/**bold** spans."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            out.append(f"<pre><code>{escape(chr(10).join(lines[i + 1:end]))}</code></pre>")
            i = end + 1
            continue
        block = _take(lines, i, lambda s: s.startswith("|")) or _take(lines, i, lambda s: s.startswith("- "))
        if block:
            out.append(_table(block) if block[0].startswith("|") else "<ul>" + "".join(f"<li>{inline(s[2:])}</li>" for s in block) + "</ul>")
            i += len(block)
        elif m := re.match(r"(#{1,6}) (.*)", line):
            n = len(m.group(1))
            out.append(f"<h{n}>{inline(m.group(2))}</h{n}>")
            i += 1
        elif line.strip():
            para = _take(lines, i, lambda s: bool(s.strip()) and not re.match(r"#{1,6} |\||- |```", s))
            out.append(f"<p>{inline(' '.join(para))}</p>")
            i += len(para)
        else:
            i += 1
    return "\n".join(out)


def _take(lines: list[str], start: int, keep) -> list[str]:
    end = start
    while end < len(lines) and keep(lines[end]):
        end += 1
    return lines[start:end]


def inline(text: str) -> str:
    """Escape text, then `code` spans (verbatim) and **bold** outside them."""
    parts = text.split("`")
    out = []
    for k, part in enumerate(parts):
        if k % 2 and k < len(parts) - 1:
            out.append(f"<code>{escape(part)}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escape(part)))
    return "".join(out)


def _cells(row: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", row.strip().removeprefix("|").removesuffix("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def _table(rows: list[str]) -> str:
    head, *body = rows
    body = [r for r in body if not re.fullmatch(r"[\s|:-]+", r)]
    th = "".join(f"<th>{inline(c)}</th>" for c in _cells(head))
    trs = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in _cells(r)) + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"
