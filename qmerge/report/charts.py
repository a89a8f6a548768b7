"""The report's charts as inline SVG drawn in Python (no script, no network): axes, a plot frame, and
each chart the report and qmerge compare draw. Every string taken from a report is escaped."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

# Series colours (no greys: those are the axes and text). A candidate keeps its colour in every chart.
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#0b3d91")
REFERENCE_COLOUR = "#333333"
FRONTIER_COLOUR = "#555555"



def is_context(candidates: dict, name: str) -> bool:
    return bool(candidates.get(name, {}).get("context"))


@dataclass(frozen=True)
class Axis:
    """A linear or log axis over [lo, hi]; values outside (and ≤ 0 on a log axis) clamp to the ends."""

    lo: float
    hi: float
    log: bool = False
    integer: bool = False

    @classmethod
    def fit(cls, values, log: bool = False, integer: bool = False) -> Axis:
        vals = [v for v in values if v is not None and math.isfinite(v) and (v > 0 or not log)]
        if not vals:
            return cls(1e-6, 1.0, log) if log else cls(0.0, 1.0)
        lo, hi = min(vals), max(vals)
        if log:
            lo, hi = (lo / 1.5, hi * 1.5) if hi / lo < 1e3 else (10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi)))
            return cls(lo, hi, True)
        pad = 0.06 * (hi - lo) if hi > lo else max(abs(hi) * 0.1, 0.5)
        return cls(lo - pad, hi + pad, False, integer)

    def frac(self, v: float) -> float:
        if self.log:
            v = max(v, self.lo) if v > 0 else self.lo
            f = math.log(v / self.lo) / math.log(self.hi / self.lo)
        else:
            f = (v - self.lo) / (self.hi - self.lo)
        return min(max(f, 0.0), 1.0)

    def ticks(self) -> list[tuple[float, str]]:
        if self.log:
            k0, k1 = math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi))
            if k1 - k0 > 3:  # at most about ten decade ticks
                return self._inside([10.0**k for k in range(k0, k1 + 1, math.ceil((k1 - k0) / 10))])
            ticks = self._inside([m * 10.0**k for k in range(k0, k1 + 1) for m in (1, 2, 5)])
            return ticks if len(ticks) >= 3 else self._inside([m * 10.0**k for k in range(k0, k1 + 1) for m in range(1, 10)])
        raw = (self.hi - self.lo) / 5
        step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
        step = max(step, 1.0) if self.integer else step
        first = math.ceil(self.lo / step) * step
        return [(v, _num(v)) for v in (first + i * step for i in range(int((self.hi - first) / step) + 1))]

    def _inside(self, values: list[float]) -> list[tuple[float, str]]:
        return [(v, _num(v)) for v in values if self.lo <= v * (1 + 1e-9) and v <= self.hi * (1 + 1e-9)]


def _num(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.6g}"
    return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


def _attrs(**kw) -> str:
    return " ".join(f'{k.rstrip("_").replace("_", "-")}="{escape(str(v))}"' for k, v in kw.items() if v is not None)


@dataclass
class Plot:
    """One chart: a plot area with axes, a data group, and a legend on the right."""

    x: Axis
    y: Axis
    xlabel: str
    ylabel: str
    width: int = 860
    height: int = 320
    left: int = 72
    right: int = 250  # legend column
    top: int = 16
    bottom: int = 46
    data: list[str] = field(default_factory=list)
    legend: list[tuple[str, str, bool, str]] = field(default_factory=list)  # label, colour, hollow, dash

    @property
    def area(self) -> tuple[int, int, int, int]:
        return self.left, self.top, self.width - self.left - self.right, self.height - self.top - self.bottom

    def px(self, v: float) -> float:
        x0, _, w, _ = self.area
        return round(x0 + self.x.frac(v) * w, 1)

    def py(self, v: float) -> float:
        _, y0, _, h = self.area
        return round(y0 + (1 - self.y.frac(v)) * h, 1)

    def line(self, points: list[tuple[float, float]], colour: str, title: str, dash: str | None = None) -> None:
        pts = " ".join(f"{self.px(x)},{self.py(y)}" for x, y in points)
        self.data.append(f"<polyline {_attrs(points=pts, fill='none', stroke=colour, stroke_width=2, stroke_dasharray=dash)}><title>{escape(title)}</title></polyline>")

    def point(self, x: float, y: float, colour: str, title: str, hollow: bool = False) -> None:
        fill = "#ffffff" if hollow else colour
        self.data.append(f"<circle {_attrs(cx=self.px(x), cy=self.py(y), r=5, fill=fill, stroke=colour, stroke_width=2)}><title>{escape(title)}</title></circle>")

    def ybar(self, x: float, lo: float, hi: float, colour: str) -> None:
        self.data.append(f"<line {_attrs(x1=self.px(x), x2=self.px(x), y1=self.py(lo), y2=self.py(hi), stroke=colour, stroke_width=2)}/>")

    def xbar(self, y_px: float, lo: float, hi: float, colour: str) -> None:
        self.data.append(f"<line {_attrs(x1=self.px(lo), x2=self.px(hi), y1=y_px, y2=y_px, stroke=colour, stroke_width=2)}/>")

    def label(self, x_px: float, y_px: float, text: str, anchor: str = "start") -> None:
        self.data.append(f"<text {_attrs(x=x_px, y=y_px, font_size=11, text_anchor=anchor)}>{escape(_short(text))}</text>")

    def svg(self, kind: str, yticks: list[tuple[float, str]] | None = None) -> str:
        x0, y0, w, h = self.area
        axes = [f"<rect {_attrs(class_='plot-area', x=x0, y=y0, width=w, height=h, fill='#ffffff', stroke='#999999')}/>"]
        for v, text in self.x.ticks():
            axes.append(f"<line {_attrs(x1=self.px(v), x2=self.px(v), y1=y0, y2=y0 + h, stroke='#eeeeee')}/>")
            axes.append(f"<text {_attrs(x=self.px(v), y=y0 + h + 16, font_size=11, text_anchor='middle')}>{escape(text)}</text>")
        for v, text in yticks if yticks is not None else self.y.ticks():
            axes.append(f"<line {_attrs(x1=x0, x2=x0 + w, y1=self.py(v), y2=self.py(v), stroke='#eeeeee')}/>")
            axes.append(f"<text {_attrs(x=x0 - 6, y=self.py(v) + 4, font_size=11, text_anchor='end')}>{escape(text)}</text>")
        axes.append(f"<text {_attrs(x=x0 + w / 2, y=self.height - 8, font_size=12, text_anchor='middle')}>{escape(self.xlabel)}</text>")
        axes.append(f"<text {_attrs(x=14, y=y0 + h / 2, font_size=12, text_anchor='middle', transform=f'rotate(-90 14 {y0 + h / 2})')}>{escape(self.ylabel)}</text>")
        legend = []
        for i, (text, colour, hollow, dash) in enumerate(self.legend):
            ly, lx = y0 + 10 + 18 * i, x0 + w + 14
            legend.append(f"<line {_attrs(x1=lx, x2=lx + 22, y1=ly, y2=ly, stroke=colour, stroke_width=2, stroke_dasharray=dash)}/>")
            if not dash:  # a dashed entry is a line, not a series of points
                legend.append(f"<circle {_attrs(cx=lx + 11, cy=ly, r=4, fill='#ffffff' if hollow else colour, stroke=colour, stroke_width=2)}/>")
            legend.append(f"<text {_attrs(x=lx + 30, y=ly + 4, font_size=11)}>{escape(_short(text))}<title>{escape(text)}</title></text>")
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" {_attrs(class_=f"chart {kind}", width=self.width, height=self.height, viewBox=f"0 0 {self.width} {self.height}")}>'
            + "".join(axes) + '<g class="data">' + "".join(self.data) + '</g><g class="legend">' + "".join(legend) + "</g></svg>"
        )


def _short(text: str, n: int = 32) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def kld_hist_chart(metrics: dict, colours: dict[str, str]) -> str:
    hists = {name: m["kld_hist"] for name, m in metrics.items() if _drawable(m.get("kld_hist"))}
    if not hists:
        return ""
    fractions = {name: [c / sum(h["counts"]) for c in h["counts"]] for name, h in hists.items()}
    edges = [e for h in hists.values() for e in h["edges"]]
    plot = Plot(Axis.fit(edges, log=True), Axis.fit([0.0] + [f for fs in fractions.values() for f in fs]), "KL divergence per token (nats, log scale)", "fraction of tokens")
    for name, h in hists.items():
        e, f = h["edges"], fractions[name]
        steps = [(e[0], 0.0)] + [p for i, fi in enumerate(f) for p in ((e[i], fi), (e[i + 1], fi))] + [(e[len(f)], 0.0)]
        plot.line(steps, colours[name], f"{name}: KLD histogram")
        plot.legend.append((name, colours[name], False, None))
    return plot.svg("kld-hist")


def _drawable(hist: dict | None) -> bool:
    return bool(hist) and len(hist["edges"]) == len(hist["counts"]) + 1 and sum(hist["counts"]) > 0


def pareto_chart(candidates: dict, metrics: dict, colours: dict[str, str]) -> str:
    pts = [(name, candidates[name]["size_bytes"] / 1e6, m["kld_mean"], m["kld_mean_se"]) for name, m in metrics.items() if candidates.get(name, {}).get("size_bytes")]
    if not pts:
        return ""
    plot = Plot(Axis.fit([p[1] for p in pts], log=True), Axis.fit([v for p in pts for v in (p[2] - p[3], p[2] + p[3])], log=True), "weights on disk (MB, log scale)", "mean KLD ± SE (log scale)")
    for name, size, kld, se in pts:
        c, hollow = colours[name], is_context(candidates, name)
        bpw = candidates[name].get("bits_per_weight")
        text = f"{name} ({bpw:.2f} bits/weight)" if bpw else name
        plot.ybar(size, kld - se, kld + se, c)
        plot.point(size, kld, c, f"{text}: {size:.1f} MB, mean KLD {kld:.3e} ± {se:.1e}", hollow)
        plot.label(plot.px(size) + 8, plot.py(kld) - 6, name)
        plot.legend.append((text + (" (context)" if hollow else ""), c, hollow, None))
    frontier = pareto_frontier([(size, kld) for name, size, kld, _ in pts if not is_context(candidates, name)])
    if len(frontier) > 1:
        plot.line(frontier, FRONTIER_COLOUR, "Pareto frontier of the deployable checkpoints", dash="6 4")
        plot.legend.append(("Pareto frontier", FRONTIER_COLOUR, False, "6 4"))
    return plot.svg("pareto")


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (size, kld) points no other point beats on both, by increasing size."""
    frontier: list[tuple[float, float]] = []
    for size, kld in sorted(points):
        if not frontier or kld < frontier[-1][1]:
            frontier.append((size, kld))
    return frontier


def layer_chart(layers: dict, colours: dict[str, str]) -> str:
    series = {name: rows for name, rows in layers.items() if rows}
    if not series:
        return ""
    all_rows = [r for rows in series.values() for r in rows]
    plot = Plot(Axis.fit([r["layer"] for r in all_rows], integer=True), Axis.fit([r["rel_error"] for r in all_rows], log=True), "layer", "relative error of hidden states (log)")
    for name, rows in series.items():
        c = colours.get(name, PALETTE[0])
        plot.line([(r["layer"], r["rel_error"]) for r in rows], c, f"{name}: relative error per layer")
        for r in rows:
            plot.point(r["layer"], r["rel_error"], c, f"{name}, layer {r['layer']}: relative error {r['rel_error']:.3e}, cosine {r.get('cosine', float('nan')):.6f}")
        plot.legend.append((name, c, False, None))
    return plot.svg("layers")


def gptq_loss_chart(log: list[dict]) -> str:
    modules = list(dict.fromkeys(r["module"] for r in log))
    plot = Plot(Axis.fit([r["layer"] for r in log], integer=True), Axis.fit([r["loss"] for r in log], log=True), "layer", "GPTQ loss (log scale)")
    for i, module in enumerate(modules):
        rows = sorted((r["layer"], r["loss"]) for r in log if r["module"] == module)
        c = PALETTE[i % len(PALETTE)]
        plot.line(rows, c, f"{module}: GPTQ loss per layer")
        for layer, loss in rows:
            plot.point(layer, loss, c, f"{module}, layer {layer}: loss {loss:.4g}")
        plot.legend.append((module, c, False, None))
    return plot.svg("gptq-loss")


@dataclass(frozen=True)
class Row:
    """One row of a dot plot: a value with a ± error bar."""

    label: str
    value: float
    se: float
    colour: str
    hollow: bool = False


def dot_plot(rows: list[Row], x: Axis, xlabel: str) -> str:
    """One labelled row per value with its ± bar (PPL per candidate; mean KLD per report in compare)."""
    if not rows:
        return ""
    pitch = 24
    plot = Plot(x, Axis(0.0, 1.0), xlabel, "", height=16 + 46 + pitch * len(rows), left=260, right=40)
    _, y0, _, _ = plot.area
    for i, r in enumerate(rows):
        y = y0 + pitch * (i + 0.5)
        se = r.se if math.isfinite(r.se) else 0.0
        plot.xbar(y, r.value - se, r.value + se, r.colour)
        fill = "#ffffff" if r.hollow else r.colour
        plot.data.append(f"<circle {_attrs(cx=plot.px(r.value), cy=y, r=5, fill=fill, stroke=r.colour, stroke_width=2)}><title>{escape(f'{r.label}: {r.value:.5g} ± {se:.2g}')}</title></circle>")
        plot.data.append(f"<text {_attrs(x=plot.left - 8, y=y + 4, font_size=11, text_anchor='end')}>{escape(_short(r.label, 40))}</text>")
    return plot.svg("dots", yticks=[])
