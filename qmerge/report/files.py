"""A run's report files, written from the report data: report.json, report.md and report.html."""

from __future__ import annotations

import json
from pathlib import Path

from qmerge.report import html, samples, search
from qmerge.report.markdown import markdown


def write(report: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(report) + search.markdown(report) + samples.markdown(report))
    (out_dir / "report.html").write_text(html.render(report))
