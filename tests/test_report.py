"""report.html (self-contained, escaped, rendered by headless Chromium with its charts drawn) and
`qmerge compare` (paired vs unpaired tests against an independent recomputation, bad input).

The schema-2 reports here are built from real metric computations: seeded random logits of a
reference and of candidates around it go through qmerge.eval.metrics.token_stats/summarize, and the
histograms and per-window sums come from the same per-token tensors."""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from browser import SVG, assert_charts_draw, needs_chromium, screenshot, svgs
from conftest import strict_report
from qmerge.models.device import device_info
from qmerge.report import charts, files, html, markdown
from qmerge.report.schema import library_versions
from qmerge.report.compare import Z_CRITICAL
from qmerge.eval.metrics import clustered_mean, log_probs, reference_stats, summarize, token_stats
from qmerge.settings import RunSettings

VOCAB, SEQ, WINDOWS, HIDDEN = 64, 33, 12, 16
# Linear layers of conftest.TINY (hidden 64, intermediate 128, 4 heads, 2 KV heads, 2 layers), the rest of it.
TINY_LINEAR = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
TINY_OTHER = 2 * 512 * 64 + 5 * 64
HOSTILE = "<img src=x onerror=alert(1)>&\"'</svg>"


def token_stream(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference logits, sampled next tokens and a per-window difficulty (windows differ, so the
    clustered SEs matter)."""
    g = torch.Generator().manual_seed(seed)
    scale = 0.5 + 2 * torch.rand(WINDOWS, 1, 1, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(WINDOWS, SEQ, VOCAB, generator=g, dtype=torch.float64) * scale
    targets = torch.multinomial(torch.softmax(ref_logits, -1).view(-1, VOCAB), 1, generator=g).view(WINDOWS, SEQ)
    return ref_logits, targets, scale


def evaluation(name: str, stream_seed: int, noises: dict[str, tuple[float, int]]) -> tuple[dict, dict]:
    """One schema-2 evaluation (and the per-token stats behind it): each candidate is the reference's
    logits plus noise of the given size and seed, scaled like the window."""
    ref_logits, targets, scale = token_stream(stream_seed)
    ref = reference_stats(log_probs(ref_logits), targets)
    clusters = torch.arange(WINDOWS).repeat_interleave(SEQ)
    edges = torch.logspace(-8, 2, 41, dtype=torch.float64)
    metrics, layers, raw = {}, {}, {}
    for cand, (noise, seed) in noises.items():
        g = torch.Generator().manual_seed(seed)
        s = token_stats(ref, log_probs(ref_logits + noise * scale * torch.randn(ref_logits.shape, generator=g, dtype=torch.float64)))
        m = summarize(s.nll_ref, s.nll, s.kld, s.top1_same, s.top5_same, clusters, scored_bytes=4 * s.nll.numel())
        bins = torch.bucketize(s.kld.clamp(1e-8, 1e2), edges[1:-1]).bincount(minlength=len(edges) - 1)
        per_window = lambda t: t.double().view(WINDOWS, SEQ).sum(1).tolist()  # noqa: E731
        m["kld_hist"] = {"edges": edges.tolist(), "counts": bins.tolist()}
        m["per_window"] = {"tokens": [SEQ] * WINDOWS, "nll": per_window(s.nll), "nll_ref": per_window(s.nll_ref), "kld": per_window(s.kld), "top1_same": per_window(s.top1_same)}
        metrics[cand], raw[cand] = m, s
        h = torch.randn(3, 64, HIDDEN, generator=g, dtype=torch.float64)
        hc = h + noise * torch.arange(1, 4, dtype=torch.float64).view(3, 1, 1) * torch.randn(h.shape, generator=g, dtype=torch.float64)
        layers[cand] = [
            {"layer": i, "rel_error": ((hc[i] - h[i]).norm() / h[i].norm()).item(), "cosine": torch.nn.functional.cosine_similarity(hc[i].flatten(), h[i].flatten(), 0).item()}
            for i in range(3)
        ]
    sha = hashlib.sha256("".join(hashlib.sha256(w.numpy().tobytes()).hexdigest() for w in targets).encode()).hexdigest()
    ev = {"eval": name, "windows": WINDOWS, "seq_len": SEQ + 1, "tokens": WINDOWS * SEQ, "scored_bytes": 4 * WINDOWS * SEQ, "windows_sha256": sha, "metrics": metrics, "layers": layers}
    return ev, {"stats": raw, "clusters": clusters}


KINDS = {"merged": "merged", "gptq 4-bit g32": "gptq", "original": "original", "base (no adapter)": "base", "noise floor": "noise-floor"}


def candidate_meta(name: str) -> dict:
    """Sizes computed for the tiny Llama: bf16 checkpoints, GPTQ 4-bit g32 with a 16-bit scale and a 4-bit zero per group."""
    kind = KINDS.get(name, "gptq")
    bpw = 4 + (16 + 4) / 32 if kind == "gptq" else 16.0
    context = kind in ("base", "noise-floor")
    return {
        "kind": kind, "context": context, "path": None if context else f"/out/{kind}", "compute_dtype": "float32",
        "size_bytes": int(TINY_LINEAR * bpw / 8 + TINY_OTHER * 2), "bits_per_weight": None if context else bpw,
    }


def gptq_log() -> list[dict]:
    """Per-module losses of a round-to-nearest 4-bit quantization of random weights of the tiny shapes."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for layer in range(2):
        for module, shape in (("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)), ("mlp.down_proj", (64, 128))):
            w = torch.randn(shape, generator=g) * (1 + layer)
            step = w.abs().amax(1, keepdim=True) / 7
            rows.append({"layer": layer, "module": module, "loss": ((w - (w / step).round() * step) ** 2).sum().item(), "samples": 16})
    return rows


def make_report(evaluations: list[dict], base_path: str = "/models/base", with_gptq_log: bool = True) -> dict:
    names = list(dict.fromkeys(n for ev in evaluations for n in ev["metrics"]))
    stage = {"wall_s": 1.5, "peak_rss_mb": 900.0, "peak_gpu_mb": None}
    rep = {
        "schema_version": 2,
        "inputs": {"base": {"spec": base_path, "path": base_path, "from_hub": False, "sha256": "0" * 64}, "adapter": {"spec": "/models/adapter", "path": "/models/adapter", "sha256": "1" * 64}, "calibration_windows": 16, "eval_windows": WINDOWS},
        "settings": RunSettings(base=base_path, adapter="/models/adapter", out="/out").to_dict(),
        "versions": library_versions(),
        "device": device_info(torch.device("cpu")),
        "merge": {},
        "stages": {"merged": stage, "gptq": stage, "drift": {"reused": True}},
        "budgets": {},
        "servers": {},
        "gptq_log": gptq_log() if with_gptq_log else [],
        "recipe": {},
        "reference": {"name": "reference (QLoRA as trained)", "kind": "qlora"},
        "candidates": {n: candidate_meta(n) for n in names},
        "evaluations": evaluations,
        "final": next((n for n in names if KINDS.get(n) == "gptq"), names[0]),
    }
    return rep


NOISES = {"merged": (0.02, 1), "gptq 4-bit g32": (0.3, 2), "original": (0.15, 3), "base (no adapter)": (1.0, 4), "noise floor": (0.004, 5)}


# The side-by-side completions: markdown and HTML syntax, a control character and the hostile name in
# prompts, texts and model names; " return x - 1" departs from the reference at its third token, " -".
PROMPT = "def f(x): <b>*bold*</b> | `tick` [link](x) # not a heading\n"
SAMPLES = {
    "source": "eval set stdlib: the first 8 tokens of its first 1 windows", "tokens": 8, "reference": "reference (QLoRA as trained)",
    "prompts": [{"prompt": PROMPT, "completions": {
        "reference (QLoRA as trained)": {"text": " return x + 1\x1b\nend", "ids": [1, 2, 3, 4, 5, 6]},
        "gptq 4-bit g32": {"text": " return x - 1", "ids": [1, 2, 7, 4], "diverges_at": 2, "marked": [9, 11]},
        "merged": {"text": " return x + 1\x1b\nend", "ids": [1, 2, 3, 4, 5, 6], "diverges_at": None, "marked": None},
        HOSTILE: {"text": HOSTILE, "ids": [9], "diverges_at": 0, "marked": [0, 5]},
    }}],
}


@pytest.fixture(scope="module")
def full_report() -> dict:
    """Two eval sets, every candidate kind, layers, a GPTQ log and side-by-side completions; a hostile
    candidate name and path."""
    noises = {**NOISES, HOSTILE: (0.5, 6)}
    rep = make_report([evaluation("stdlib", 1, noises)[0], evaluation("wikitext2", 2, noises)[0]], base_path="/models/</code><script>alert(1)</script>")
    return {**rep, "samples": SAMPLES}


def test_html_self_contained_well_formed_and_escaped(full_report, tmp_path):
    files.write(full_report, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert page == html.render(full_report)
    # no reference to anything outside the file, and no code
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//|file:)""", page, re.I)
    assert "@import" not in page and "url(" not in page and not re.search(r"<(?:script|link|img|iframe|object|embed)\b", page, re.I)
    # well-formed XML (so every SVG parses), the hostile name and path escaped wherever they appear
    root = ET.fromstring(page)
    text = "".join(root.itertext())
    assert HOSTILE in text and "</code><script>alert(1)</script>" in text
    assert page.count(html.escape(HOSTILE)) >= 6  # tables, legends, tooltips of both eval sets
    kinds = [s.get("class") for s in svgs(page)]
    assert kinds == ["chart kld-hist", "chart pareto", "chart dots", "chart layers"] * 2 + ["chart gptq-loss"]
    # the tables are report.md's: every table row of the markdown is a row of the page
    md_rows = [line for line in markdown.markdown(full_report).splitlines() if line.startswith("|") and not re.fullmatch(r"[|:\- ]+", line)]
    assert len([tr for table in root.iter("table") if table.get("class") != "samples" for tr in table.iter("tr")]) == len(md_rows)
    first = md_rows[1].split("|")[2].strip()  # a formatted number of the first table, verbatim
    assert first in text


def test_completions_side_by_side_are_escaped_present_and_marked(full_report, tmp_path):
    """report.md and report.html show every prompt and completion as text, nothing of it read as
    markup, and the first differing token marked (and only for the model that differs)."""
    files.write(full_report, tmp_path)
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    root = ET.fromstring(page)
    table = next(t for t in root.iter("table") if t.get("class") == "samples")
    cells = {"".join(tr[0].itertext()): tr[1] for tr in table.iter("tr") if tr[0].tag == "td"}
    assert set(cells) == set(SAMPLES["prompts"][0]["completions"])
    assert "".join(cells["reference (QLoRA as trained)"].itertext()) == " return x + 1\u241b\nend"  # ESC shown as its control picture
    marks = {name: [m.text for m in cell.iter("mark")] for name, cell in cells.items()}
    assert marks == {"reference (QLoRA as trained)": [], "gptq 4-bit g32": [" -"], "merged": [], HOSTILE: ["<img "]}
    assert "".join(cells["gptq 4-bit g32"].itertext()) == " return x - 1" and "<img src" not in page and "\x1b" not in page
    assert next(p for p in root.iter("pre") if p.get("class") == "prompt").text == PROMPT
    section = md[md.index("## Completions side by side"):]
    assert "> def f(x): \\<b\\>\\*bold\\*\\</b\\> | \\`tick\\` \\[link\\](x) \\# not a heading⏎" in section
    assert "| gptq 4-bit g32 |  return x⟦ -⟧ 1 | token 3 |" in section and "| merged |  return x + 1␛⏎end | none |" in section
    assert f"⟦{html.escape('<img ')}⟧" not in section and "⟦\\<img ⟧" in section and "(reference)" in section
    assert markdown.md_table(["a"], [["x|y"]]).count("\\|") == 1  # a pipe in a completion stays inside its cell


def test_undefined_numbers_are_null_in_json_and_nan_on_the_page(full_report, tmp_path):
    """A standard error of one window is undefined: null in report.json (strict JSON), "nan" in the
    markdown, whether rendered at once or from evaluations read back (as the pipeline reads the drift
    stage's file)."""
    rep = json.loads(json.dumps(full_report))
    first = next(iter(rep["evaluations"][0]["metrics"].values()))
    first["kld_mean_se"] = first["ppl_se"] = float("nan")
    rep["evaluations"][0]["layers"][next(iter(rep["evaluations"][0]["layers"]))][0]["rel_error"] = float("inf")
    files.write(rep, tmp_path)
    saved = strict_report(tmp_path / "report.json")
    assert next(iter(saved["evaluations"][0]["metrics"].values()))["kld_mean_se"] is None
    back = files.undefined_as_nan(json.loads(files.dumps(rep["evaluations"])))
    assert "nan" in markdown.markdown({**rep, "evaluations": back}) and "nan" in (tmp_path / "report.md").read_text()


def test_chart_geometry_follows_the_numbers(full_report):
    """Pareto points sit where their size and KLD put them; the frontier is the non-dominated set."""
    page = html.render(full_report)
    pareto = svgs(page)[1]
    m = full_report["evaluations"][0]["metrics"]
    circles = {c.find(SVG + "title").text.split(" (")[0].split(":")[0]: c for c in pareto.find(SVG + "g").iter(SVG + "circle")}
    names = [n for n in m if n in circles]
    assert len(names) == len(m) - 1  # the hostile name's tooltip splits differently; five remain
    by_kld = sorted(names, key=lambda n: m[n]["kld_mean"])
    assert [float(circles[n].get("cy")) for n in by_kld] == sorted((float(circles[n].get("cy")) for n in names), reverse=True)
    assert charts.pareto_frontier([(1, 5), (2, 3), (3, 4), (4, 1), (4, 2)]) == [(1, 5), (2, 3), (4, 1)]
    axis = charts.Axis(1e-8, 1e2, log=True)
    assert math.isclose(axis.frac(1e-3), 0.5) and axis.frac(0) == 0.0 and axis.frac(1e5) == 1.0
    assert [t for _, t in axis.ticks()] == ["1e-8", "1e-7", "1e-6", "1e-5", "1e-4", "0.001", "0.01", "0.1", "1", "10", "100"]


def test_html_without_optional_parts():
    """One eval set, no layers, no GPTQ log, context rows without bits per weight: the charts that can be drawn are."""
    ev, _ = evaluation("stdlib", 3, {"merged": (0.02, 1), "base (no adapter)": (1.0, 2)})
    ev["layers"] = {}
    page = html.render(make_report([ev], with_gptq_log=False))
    assert [s.get("class") for s in svgs(page)] == ["chart kld-hist", "chart pareto", "chart dots"]


# ----- headless Chromium ----------------------------------------------------------------------------

@needs_chromium
def test_console_errors_are_caught(tmp_path):
    """The scan below sees what a page logs: a page that throws is caught."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>console.error('boom'); missing()</script></body></html>")
    lines = screenshot(page, tmp_path / "bad.png", 400, 300)
    assert any("boom" in line for line in lines) and any("Uncaught ReferenceError" in line for line in lines)


@needs_chromium
def test_report_html_renders_without_console_errors(full_report, tmp_path):
    files.write(full_report, tmp_path)
    png = tmp_path / "page.png"
    assert screenshot(tmp_path / "report.html", png, 1200, 4000) == []
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    assert (pixels != 255).any(-1).mean() > 0.02  # not a blank page


@needs_chromium
def test_every_chart_draws_its_series(full_report, tmp_path):
    assert assert_charts_draw(html.render(full_report), tmp_path) >= 8


# ----- qmerge compare -------------------------------------------------------------------------------


def qmerge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qmerge.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A: the baseline run. B: the same token stream, new noise (GPTQ a little worse). C: another token stream."""
    d = tmp_path_factory.mktemp("compare")
    a_ev, a_raw = evaluation("stdlib", 1, {"merged": (0.02, 1), "gptq 4-bit g32": (0.3, 2), "base (no adapter)": (1.0, 4)})
    b_ev, b_raw = evaluation("stdlib", 1, {"merged": (0.02, 11), "gptq 4-bit g32": (0.33, 12)})
    c_ev, c_raw = evaluation("stdlib", 2, {"gptq 4-bit g32": (0.33, 12)})
    paths = []
    for label, ev in zip("ABC", (a_ev, b_ev, c_ev)):
        (d / label).mkdir()
        (d / label / "report.json").write_text(json.dumps(make_report([ev])))
        paths.append(str(d / label / "report.json"))
    r = qmerge("compare", *paths, "--json", "--html", str(d / "compare.html"))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), (a_ev, b_ev, c_ev), (a_raw, b_raw, c_raw), paths, d


def rows_of(result: dict) -> dict:
    return {(r["candidate"], r["report"]): r for r in result["evaluations"][0]["rows"]}


def test_compare_paired_matches_independent_recomputation(compared):
    """Same token stream: B − A per token, clustered over windows by metrics.clustered_mean (1e-9 rel)."""
    result, _, (a_raw, b_raw, _), _, _ = compared
    rows = rows_of(result)
    assert result["evaluations"][0]["same_token_stream"] == {"A": True, "B": True, "C": False}
    a, b, clusters = a_raw["stats"], b_raw["stats"], a_raw["clusters"]
    for cand in ("merged", "gptq 4-bit g32"):
        vs = rows[(cand, "B")]["vs"]
        assert vs["test"] == "paired"
        per_token = {
            "kld_mean": b[cand].kld - a[cand].kld,
            "ln_ppl_ratio": (b[cand].nll - b[cand].nll_ref) - (a[cand].nll - a[cand].nll_ref),
            "top1_agreement": b[cand].top1_same.double() - a[cand].top1_same.double(),
        }
        for stat, values in per_token.items():
            mean, se = clustered_mean(values, clusters)
            got = vs[stat]
            assert math.isclose(got["diff"], mean, rel_tol=1e-9, abs_tol=1e-15) and math.isclose(got["se"], se, rel_tol=1e-9), (cand, stat, got, mean, se)
            assert got["significant"] == (abs(mean / se) > Z_CRITICAL)
    gptq = rows[("gptq 4-bit g32", "B")]["vs"]["kld_mean"]
    assert gptq["significant"] and gptq["z"] > 3  # 10% more noise on the same tokens: detected (z = 5.0 measured)
    unpaired_se = math.hypot(rows[("gptq 4-bit g32", "A")]["kld_mean_se"], rows[("gptq 4-bit g32", "B")]["kld_mean_se"])
    assert gptq["se"] < unpaired_se / 3  # 5.2× smaller measured; what pairing buys: the shared window effects cancel
    assert ("base (no adapter)", "B") not in rows and "vs" not in rows[("base (no adapter)", "A")]


def test_compare_unpaired_when_streams_differ(compared):
    result, (a_ev, _, c_ev), _, _, _ = compared
    vs = rows_of(result)[("gptq 4-bit g32", "C")]["vs"]
    assert vs["test"] == "unpaired"
    a, c = a_ev["metrics"]["gptq 4-bit g32"], c_ev["metrics"]["gptq 4-bit g32"]
    for stat in ("kld_mean", "ln_ppl_ratio", "top1_agreement"):
        diff, se = c[stat] - a[stat], math.sqrt(a[stat + "_se"] ** 2 + c[stat + "_se"] ** 2)
        assert math.isclose(vs[stat]["diff"], diff, rel_tol=1e-12) and math.isclose(vs[stat]["se"], se, rel_tol=1e-12)
        assert vs[stat]["significant"] == (abs(diff / se) > Z_CRITICAL)


def test_compare_markdown_and_html(compared):
    result, _, _, paths, d = compared
    r = qmerge("compare", *paths)
    assert r.returncode == 0, r.stderr
    md = r.stdout
    assert f"|z| > {Z_CRITICAL}" in md and "a different token stream (unpaired tests)" in md and "the same token stream as A" in md
    row = next(line for line in md.splitlines() if line.startswith("| gptq 4-bit g32 | B |"))
    z = rows_of(result)[("gptq 4-bit g32", "B")]["vs"]["kld_mean"]["z"]
    assert f"({z:+.1f}) *" in row and row.endswith("| paired |")
    page = (d / "compare.html").read_text()
    root = ET.fromstring(page)
    assert [s.get("class") for s in root.iter(SVG + "svg")] == ["chart dots"] and len(list(root.iter("tr"))) == 1 + len(result["evaluations"][0]["rows"])


def test_compare_matches_rows_by_kind_and_names_the_settings(tiny_run, tmp_path, cli):
    """A g32 report against a g64 one (the same run, its GPTQ rows renamed and its settings changed as
    a g64 run's are): the GPTQ and RTN rows side by side with their difference and the group size
    named; the other rows say their settings are the same."""
    a = strict_report(tiny_run.out / "report.json")
    b = json.loads(json.dumps(a))
    b["settings"]["gptq"]["group_size"] = 64
    renames = {"gptq 4-bit g32": "gptq 4-bit g64", "rtn 4-bit g32": "rtn 4-bit g64"}
    b["candidates"] = {renames.get(k, k): v for k, v in b["candidates"].items()}
    for ev in b["evaluations"]:
        ev["metrics"] = {renames.get(k, k): v for k, v in ev["metrics"].items()}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    r = cli("compare", tmp_path / "a.json", tmp_path / "b.json", "--json")
    assert r.returncode == 0, r.stderr
    rows = {(row["kind"], row["report"]): row for row in strict_json_line(r.stdout)["evaluations"][0]["rows"]}
    for kind, name in (("gptq", "gptq 4-bit g64"), ("rtn", "rtn 4-bit g64")):
        row = rows[(kind, "B")]
        assert row["candidate"] == name and row["settings_differ"] == ["group_size 32 → 64"]
        assert row["vs"]["test"] == "paired" and row["vs"]["kld_mean"]["diff"] == 0  # the same numbers under the new name
    assert rows[("merged", "B")]["settings_differ"] == [] and "vs" in rows[("merged", "B")]
    md = cli("compare", tmp_path / "a.json", tmp_path / "b.json").stdout
    assert any(line.startswith("| gptq 4-bit g64 | B |") and "group_size 32 → 64" in line for line in md.splitlines())


def strict_json_line(text: str) -> dict:
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def test_compare_bad_input_exits_2(compared, tmp_path):
    _, _, _, paths, _ = compared
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps({"schema_version": 1, "metrics": {}}))
    other = tmp_path / "other.json"
    other_rep = json.loads(Path(paths[1]).read_text())
    other_rep["evaluations"][0]["eval"] = "wikitext2"
    other.write_text(json.dumps(other_rep))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    damaged = json.loads(Path(paths[1]).read_text())
    del damaged["evaluations"][0]["metrics"]["merged"]["kld_mean_se"]
    (tmp_path / "damaged.json").write_text(json.dumps(damaged))
    cases = {
        "no such file": [paths[0], str(tmp_path / "missing.json")],
        "not a readable JSON report": [paths[0], str(tmp_path / "bad.json")],
        "not a qmerge report": [paths[0], str(tmp_path / "list.json")],
        "schema_version 1": [paths[0], str(v1)],
        "damaged": [paths[0], str(tmp_path / "damaged.json")],
        "shares no eval set": [paths[0], str(other)],
        "at least two": [paths[0]],
        "folder does not exist": [*paths[:2], "--html", str(tmp_path / "nowhere" / "x.html")],
    }
    for cause, args in cases.items():
        r = qmerge("compare", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("qmerge: error:") and cause in lines[0], (cause, r.stderr)
        assert r.stdout == ""
    assert not (tmp_path / "nowhere").exists()
