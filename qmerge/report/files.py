"""A run's report files, written from the report data: report.json, report.md and report.html; and the
one JSON writer every qmerge JSON output goes through."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qmerge.report import html, samples, search
from qmerge.report.markdown import markdown


def finite(value):
    """`value` with every NaN or infinite float replaced by None (JSON null): a standard error of one
    window, say, is undefined, and NaN and Infinity are not JSON (strict parsers refuse them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def undefined_as_nan(evaluations: list[dict]) -> list[dict]:
    """Evaluations read back from JSON with their undefined numbers (null: a standard error of one
    window, the relative error of a zero hidden state) as NaN again, the float the renderers print."""
    nan = float("nan")
    for ev in evaluations:
        for metrics in ev["metrics"].values():
            metrics.update({k: nan for k, v in metrics.items() if v is None})
        for rows in ev.get("layers", {}).values():
            for row in rows:
                row.update({k: nan for k, v in row.items() if v is None})
    return evaluations


def dumps(value, **kwargs) -> str:
    """Strict JSON of `value` (non-finite numbers as null; allow_nan=False catches any left)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def write(report: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(report) + search.markdown(report) + samples.markdown(report))
    (out_dir / "report.html").write_text(html.render(report))
