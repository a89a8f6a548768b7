"""The side-by-side completions of report.json's `samples` in report.md and report.html: per prompt,
the reference's greedy completion and each other model's, the first token where a model departs
from the reference marked (⟦…⟧ in the markdown, <mark> in the page).

Prompts and completions are model output and user input: the markdown escapes every character
markdown would read as syntax, the page escapes HTML; newlines show as ⏎ in the markdown (a table
cell holds one line) and as line breaks in the page.
"""

from __future__ import annotations

import re
from html import escape

from qmerge.report.markdown import md_table

LEGEND = ("Greedy completions (argmax at every step) of the same prompts. {mark} the first token where a model's "
          "completion departs from the reference's; what follows it is conditioned on a different prefix.")


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\ufffe\uffff]")


def visible(text: str) -> str:
    """Control characters a model may emit (byte-level tokens decode to any byte) shown as their
    Unicode control pictures: they are invalid in XML and invisible or disruptive in a terminal."""
    return _CONTROL.sub(lambda m: chr(0x2400 + ord(m.group())) if ord(m.group()) < 0x20 else "\u2421" if m.group() == "\x7f" else "\ufffd", text)


def _md_text(text: str) -> str:
    """Literal text in markdown: syntax characters backslash-escaped ('|' is md_table's), newlines as ⏎."""
    return re.sub(r"([\\`*_\[\]<>#&!~])", r"\\\1", visible(text)).replace("\n", "⏎")


def rows(report: dict):
    """Per prompt: its text, and per model (name, the text the same as the reference's, the first
    differing token, the rest, where it departs in words)."""
    for row in report["samples"]["prompts"]:
        yield row["prompt"], [(name, *_parts(entry), _diverges(entry)) for name, entry in row["completions"].items()]


def _parts(entry: dict) -> tuple[str, str, str]:
    """(same as the reference, the first differing token, the rest) of one completion."""
    text, marked = entry["text"], entry.get("marked")
    if not marked:
        return text, "", ""
    start, end = marked
    return text[:start], text[start:end], text[end:]


def _diverges(entry: dict) -> str:
    if "diverges_at" not in entry:
        return "(reference)"
    k = entry["diverges_at"]
    return "none" if k is None else f"token {k + 1}"


def _section(report: dict, header, block) -> str:
    """`header(samples)` then `block(number, prompt, models)` per prompt; "" when the report has no completions."""
    s = report.get("samples")
    if not s:
        return ""
    return "\n".join([header(s), *(block(i, prompt, models) for i, (prompt, models) in enumerate(rows(report), 1))])


def markdown(report: dict) -> str:
    """The `## Completions side by side` section of report.md."""
    return _section(report, _md_header, _md_block)


def _md_header(s: dict) -> str:
    return f"## Completions side by side\n\n{LEGEND.format(mark='⟦…⟧ marks')} Prompts: {_md_text(s['source'])}; up to {s['tokens']} new tokens.\n"


def _md_block(i: int, prompt: str, models: list) -> str:
    cells = [[name, _md_text(same) + (f"⟦{_md_text(token)}⟧" if token else "") + _md_text(rest) or "(nothing)", where] for name, same, token, rest, where in models]
    return f"### Prompt {i}\n\n> {_md_text(prompt)}\n\n" + md_table(["model", "completion", "first difference"], cells)


def html(report: dict) -> str:
    """The same section for report.html (escaped; the divergent token in <mark>, what follows it greyed)."""
    return _section(report, _html_header, _html_block)


def _html_header(s: dict) -> str:
    return f"<h2>Completions side by side</h2>\n<p>{escape(LEGEND.format(mark='Highlighted:'))} Prompts: {escape(s['source'])}; up to {s['tokens']} new tokens.</p>"


def _html_block(i: int, prompt: str, models: list) -> str:
    trs = []
    for name, same, token, rest, where in models:
        same, token, rest = (escape(visible(t)) for t in (same, token, rest))
        cell = same + (f'<mark>{token}</mark><span class="after">{rest}</span>' if token else rest)
        trs.append(f'<tr><td>{escape(name)}</td><td class="text">{cell}</td><td>{escape(where)}</td></tr>')
    return (
        f'<h3>Prompt {i}</h3>\n<pre class="prompt">{escape(visible(prompt))}</pre>\n'
        f'<table class="samples"><thead><tr><th>model</th><th>completion</th><th>first difference</th></tr></thead><tbody>{"".join(trs)}</tbody></table>'
    )
