"""Headless Chromium for the report.html tests: render a page, collect what its console logged, and
check from the screenshot that every chart drew its data."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qmerge.report.charts import PALETTE

SVG = "{http://www.w3.org/2000/svg}"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (scripts/setup.sh installs Debian's chromium when run as root)")


def needs_chromium(test):
    """Headless Chromium renders the page: seconds per screenshot, so the slow tier."""
    return pytest.mark.slow(_chromium(test))


def svgs(page: str) -> list[ET.Element]:
    return list(ET.fromstring(page).iter(SVG + "svg"))


def screenshot(page: Path, png: Path, width: int, height: int) -> list[str]:
    """Render `page` in headless Chromium; returns the console lines (messages, uncaught errors) it logged."""
    r = subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0", "--force-device-scale-factor=1",
         "--hide-scrollbars", f"--user-data-dir={png.parent / 'profile'}", f"--screenshot={png}", f"--window-size={width},{height}", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert r.returncode == 0 and png.exists(), r.stderr[-2000:]
    return [line for line in r.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def colour_pixels(crop: np.ndarray, colour: str, tol: int = 8) -> int:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(crop.astype(int) - rgb).max(-1) <= tol).sum())


def assert_charts_draw(rendered: str, tmp_path: Path, every_series: bool = True) -> int:
    """Each chart of a rendered report, stacked alone, screenshotted: inside its plot area, every colour
    its data group uses shows on at least 15 pixels (a hollow marker's ring: about 25; legends and labels
    are outside the area or not coloured); with every_series=False (real runs, whose series may lie on
    top of each other) the series' colours together cover at least 100 pixels. Returns the number of charts."""
    charts, parts = svgs(rendered), re.findall(r"<svg .*?</svg>", rendered, re.S)
    page = tmp_path / "charts.html"
    page.write_text('<!DOCTYPE html><html><body style="margin:0">' + "".join(f'<div style="height:{s.get("height")}px">{p}</div>' for s, p in zip(charts, parts)) + "</body></html>")
    png = tmp_path / "charts.png"
    heights = [int(s.get("height")) for s in charts]
    assert screenshot(page, png, max(int(s.get("width")) for s in charts), sum(heights)) == []
    image = np.asarray(Image.open(png).convert("RGB"))
    top = 0
    for chart, height in zip(charts, heights):
        area = next(r for r in chart.iter(SVG + "rect") if r.get("class") == "plot-area")
        x, y, w, h = (int(float(area.get(k))) for k in ("x", "y", "width", "height"))
        crop = image[top + y + 1: top + y + h - 1, x + 1: x + w - 1]
        used = {e.get(a) for e in chart.find(SVG + "g").iter() for a in ("stroke", "fill")} & set(PALETTE)
        counts = {c: colour_pixels(crop, c) for c in used}
        drawn = min(counts.values(), default=0) >= 15 if every_series else sum(counts.values()) >= 100
        assert used and drawn, (chart.get("class"), counts)
        top += height
    return len(charts)
