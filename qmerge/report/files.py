"""A run's report files, written from the report data: report.json, report.md and report.html; and the
one JSON writer every qmerge JSON output goes through."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qmerge.report import html
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


def dumps(value, **kwargs) -> str:
    """Strict JSON of `value` (non-finite numbers as null; allow_nan=False catches any left)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def write(report: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(report))
    (out_dir / "report.html").write_text(html.render(report))
