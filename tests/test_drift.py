"""The drift report on the tiny model: every candidate kind, sizes, RTN, per-layer drift, several eval
sets, the per-window and histogram series, and the overlap rule, each checked against an independent
recomputation or the library that defines the format."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qmerge
from browser import assert_charts_draw, needs_chromium, screenshot
from conftest import one_line_error, reference_model, tiny_run_settings
from qmerge.eval import drift
from qmerge.io import text
from qmerge.io.corpus import stdlib_part
from qmerge.models.checkpoints import load_candidate
from qmerge.models.reference import load_reference, peft_nf4
from qmerge.quant import rtn
from qmerge.merge.adapter import load_mix
from qmerge.eval.candidates import display_name
from qmerge.errors import QmergeError
from qmerge.settings import CANDIDATE_KINDS, DataSettings, GPTQSettings, NF4Settings, RunSettings

GPTQ = GPTQSettings(group_size=32)
SEQ, EVAL_WINDOWS = 64, 6
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def run(tiny_run) -> tuple[Path, dict]:
    """The shared run: every candidate kind (gptq-original included) on two eval sets."""
    return tiny_run.out, tiny_run.report


def name(kind: str) -> str:
    return display_name(kind, GPTQ)


def payload_bytes(path: Path) -> int:
    """Tensor bytes of a safetensors file: its size minus the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return path.stat().st_size - 8 - header


def linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    config = json.loads((model_dir / "config.json").read_text())
    h, i, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"] * config["hidden_size"] // config["num_attention_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    return {f"model.layers.{n}.{'self_attn' if m.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{m}": s
            for n in range(config["num_hidden_layers"]) for m, s in shapes.items()}


def test_every_candidate_has_a_row(run):
    out, rep = run
    assert rep["schema_version"] == 2 and rep["final"] == name("gptq") and rep["reference"]["kind"] == "qlora"
    kinds = [c["kind"] for c in rep["candidates"].values()]
    assert kinds == [*CANDIDATE_KINDS, "noise-floor"]
    c = {row["kind"]: row for row in rep["candidates"].values()}
    assert [k for k, row in c.items() if row["context"]] == ["base", "noise-floor"]
    assert c["gptq-original"]["path"] == str(out / "gptq-original") and (out / "gptq-original" / "quantize_config.json").exists()
    assert c["merged"]["path"] == str(out / "merged") and c["rtn"]["path"] is None and c["peft-nf4"]["path"] is None
    assert c["noise-floor"]["compute_dtype"] == "bfloat16" and c["peft-nf4"]["compute_dtype"] == "float32"
    assert set(rep["stages"]) == {"nf4", "merged", "gptq", "merged-original", "gptq-original", "drift"}
    assert len(rep["gptq_log"]) == 14 and list(rep["budgets"]) == ["max_kld"] and rep["budgets"]["max_kld"]["ok"]
    for e in rep["evaluations"]:
        assert list(e["metrics"]) == list(rep["candidates"]) == list(e["layers"])


def test_sizes_and_bits_per_weight(run, tiny_base, tiny_adapter, tmp_path):
    """Written checkpoints: the tensor bytes of their files; in-memory ones: what their format writes."""
    out, rep = run
    c = {row["kind"]: row for row in rep["candidates"].values()}
    shapes = linear_shapes(out / "merged")
    params = sum(r * k for r, k in shapes.values())
    for kind, folder in (("merged", "merged"), ("gptq", "gptq"), ("gptq-original", "gptq-original")):
        assert c[kind]["size_bytes"] == sum(payload_bytes(f) for f in (out / folder).glob("*.safetensors")), kind
    assert c["merged"]["bits_per_weight"] == c["original"]["bits_per_weight"] == 16.0 and c["original"]["size_bytes"] == c["merged"]["size_bytes"]
    # GPTQ v1: 4-bit codes, per group of 32 an fp16 scale and a 4-bit zero point, an int32 g_idx per input
    gptq_bits = sum(r * k * 4 + (k // 32) * r * (16 + 4) + k * 32 for r, k in shapes.values()) / params
    for kind in ("rtn", "gptq", "gptq-original"):
        assert c[kind]["bits_per_weight"] == pytest.approx(gptq_bits, rel=1e-12), kind
    assert c["rtn"]["size_bytes"] == c["gptq"]["size_bytes"]
    # PEFT's 4-bit merge as bitsandbytes itself saves it: the same bytes for the linear layers
    saved = tmp_path / "peft-nf4"
    peft_nf4(load_reference(tiny_base, load_mix((str(tiny_adapter),)), NF4Settings(), torch.device("cpu"))).save_pretrained(saved)
    from safetensors import safe_open

    with safe_open(saved / "model.safetensors", "pt") as f:
        linear_bytes = sum(f.get_tensor(k).nbytes for k in f.keys() if any(f".{m}." in k for m in LINEARS))
    assert c["peft-nf4"]["bits_per_weight"] == pytest.approx(8 * linear_bytes / params, rel=1e-12)
    assert c["peft-nf4"]["bits_per_weight"] > 4 + 8 / 64  # 4-bit codes + a uint8 absmax per block of 64, + constants
    assert c["base"]["bits_per_weight"] is None and c["base"]["size_bytes"] == payload_bytes(tiny_base / "model.safetensors")


def independent_rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric round-to-nearest, written out: scale = 2·max|w| / (2^bits − 1) per row and group,
    zero point 2^(bits−1), scale stored as float16."""
    maxq = 2**bits - 1
    out = torch.empty_like(w)
    for s in range(0, w.shape[1], group):
        g = w[:, s : s + group]
        xmax = torch.maximum(g.min(1, keepdim=True).values.abs(), g.max(1, keepdim=True).values)
        scale = 2 * xmax / maxq
        q = torch.clamp(torch.round(g / scale) + (maxq + 1) / 2, 0, maxq)
        out[:, s : s + group] = scale.half().float() * (q - (maxq + 1) / 2)
    return out


@pytest.mark.parametrize("bits", [4, 3])
def test_rtn_matches_independent_rounding(run, bits):
    out, _ = run
    w = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).model.layers[0].mlp.down_proj.weight.detach()
    expected = independent_rtn(w, bits, 32)
    got = rtn.fake_quantize(w, GPTQSettings(bits=bits, group_size=32))
    assert torch.equal(got, expected)
    assert len(torch.unique(got[0, :32])) <= 2**bits


def eval_windows(tiny_base: Path) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(tiny_base)
    return text.token_windows(stdlib_part("eval"), tok, SEQ, EVAL_WINDOWS, "eval")


def test_rtn_candidate_kld_matches_recomputation(run, tiny_base, tiny_adapter):
    """The rtn row = DIR/merged with every linear rounded independently, against the PEFT reference (1e-4 rel)."""
    out, rep = run
    windows = eval_windows(tiny_base)
    inputs = windows[:, :-1]
    model = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    with torch.no_grad():
        for n in linear_shapes(out / "merged"):
            lin = model.get_submodule(n)
            lin.weight.copy_(independent_rtn(lin.weight, 4, 32))
        ref = torch.log_softmax(reference_model(tiny_base, tiny_adapter)(inputs).logits.double(), -1)
        lp = torch.log_softmax(model(inputs).logits.double(), -1)
    kld = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    got = rep["evaluations"][0]["metrics"][name("rtn")]["kld_mean"]
    assert math.isclose(got, kld, rel_tol=1e-4), (got, kld)


def test_layer_drift_matches_recomputation(run, tiny_base, tiny_adapter):
    """Per decoder layer of the merged candidate: ‖h − h_ref‖/‖h_ref‖ over all tokens and the mean
    per-token cosine, from the models' hidden states computed here (1e-5 rel)."""
    out, rep = run
    inputs = eval_windows(tiny_base)[:, :-1]
    with torch.no_grad():
        ref = reference_model(tiny_base, tiny_adapter)(inputs, output_hidden_states=True).hidden_states
        hid = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)(inputs, output_hidden_states=True).hidden_states
    rows = rep["evaluations"][0]["layers"][name("merged")]
    assert [r["layer"] for r in rows] == [0, 1]
    for i, row in enumerate(rows):
        r, h = ref[i + 1].double(), hid[i + 1].double()
        rel = ((h - r).norm() / r.norm()).item()
        cos = ((h * r).sum(-1) / (h.norm(dim=-1) * r.norm(dim=-1))).mean().item()
        assert math.isclose(row["rel_error"], rel, rel_tol=1e-5) and math.isclose(row["cosine"], cos, rel_tol=1e-9), (row, rel, cos)
    layers = rep["evaluations"][0]["layers"]
    assert layers[name("gptq")][-1]["rel_error"] > 10 * rows[-1]["rel_error"]  # GPTQ moves hidden states far more than the merge


def test_per_window_and_histogram_reproduce_the_summary(run):
    _, rep = run
    for e in rep["evaluations"]:
        assert e["tokens"] == EVAL_WINDOWS * (SEQ - 1) and e["windows"] == EVAL_WINDOWS
        for n, m in e["metrics"].items():
            w = m["per_window"]
            tokens = sum(w["tokens"])
            assert tokens == m["tokens"] == sum(m["kld_hist"]["counts"]) and len(w["kld"]) == EVAL_WINDOWS, n
            assert math.isclose(sum(w["kld"]) / tokens, m["kld_mean"], rel_tol=1e-9, abs_tol=1e-15), n
            assert math.isclose(math.exp(sum(w["nll"]) / tokens), m["ppl"], rel_tol=1e-9), n
            assert math.isclose(math.exp(sum(w["nll_ref"]) / tokens), m["ppl_ref"], rel_tol=1e-9), n
            assert math.isclose(sum(w["top1_same"]) / tokens, m["top1_agreement"], rel_tol=1e-12), n
            edges = m["kld_hist"]["edges"]
            assert len(edges) == len(m["kld_hist"]["counts"]) + 1 and edges[0] == pytest.approx(1e-8) and edges[-1] == pytest.approx(1e2)


def test_two_eval_sets(run, other_text):
    _, rep = run
    first, second = rep["evaluations"]
    assert (first["eval"], second["eval"]) == ("stdlib", str(other_text))
    assert first["windows_sha256"] != second["windows_sha256"] and first["calibration_overlap"] == second["calibration_overlap"] == 0.0
    assert first["metrics"][name("merged")]["kld_mean"] != second["metrics"][name("merged")]["kld_mean"]
    md = (Path(rep["candidates"][name("merged")]["path"]).parent / "report.md").read_text()
    assert "### Eval set `stdlib`" in md and f"### Eval set `{other_text}`" in md and "## Where the error enters" in md


def test_resume_reuses_every_stage(run, tiny_base, tiny_adapter, other_text):
    out, rep = run
    again = qmerge.run(str(tiny_base), str(tiny_adapter), out, resume=True, **tiny_run_settings(other_text)).report
    assert all(st == {"reused": True} for st in again["stages"].values()) and again["evaluations"] == rep["evaluations"]


def test_overlapping_eval_set_is_refused_then_forced(tiny_base, tiny_adapter, tmp_path, cli):
    same = tmp_path / "same.txt"
    same.write_text("\n\n".join(stdlib_part("eval")))
    args = ["run", "--base", str(tiny_base), "--adapter", str(tiny_adapter), "--seq-len", "64", "--calibration", str(same),
            "--calibration-samples", "4", "--eval", f"stdlib,{same}", "--eval-samples", "2", "--skip-gptq", "--candidates", "merged"]
    one_line_error(cli(*args, "--out", tmp_path / "a"), 2, "2 of 2 windows of eval set 'stdlib' also occur in the calibration set", "--allow-overlap")
    assert not (tmp_path / "a").exists()
    forced = cli(*args, "--out", tmp_path / "b", "--allow-overlap")
    assert forced.returncode == 0, forced.stderr[-2000:]
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert [e["calibration_overlap"] for e in rep["evaluations"]] == [1.0, 1.0]
    assert list(rep["candidates"]) == [name("merged"), drift.NOISE_FLOOR]
    assert "also in the calibration set (--allow-overlap)" in (tmp_path / "b" / "report.md").read_text()


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"candidates": ("merged", "fp8")}, "--candidates 'fp8' is unknown"),
        ({"candidates": ("rtn", "merged")}, "must include gptq"),
        ({"candidates": ("gptq",), "skip_gptq": True}, "must include merged"),
        ({"data": DataSettings(eval=())}, "names no eval set"),
        ({"data": DataSettings(eval=("stdlib", "stdlib"))}, "names a set twice"),
        ({"data": DataSettings(eval_batch=-1)}, "--eval-batch -1 must be 0"),
    ],
)
def test_bad_candidate_and_eval_settings(changes, words, tmp_path):
    with pytest.raises(QmergeError, match=words.replace("(", r"\(")):
        RunSettings(base="b", adapter="a", out=tmp_path, **changes).validate()


@needs_chromium
def test_report_html_of_a_real_run_renders_and_draws(run, tmp_path):
    """The page a run writes (every candidate kind, two eval sets, GPTQ log): no console output in
    headless Chromium, and every chart draws its series: per eval set the KLD distribution, size vs
    KLD, PPL and per-layer drift, plus the GPTQ per-module loss. Real rows can lie on top of each other
    (same size on disk: merged and original, rtn and gptq; near-equal per-layer errors), so each chart
    must show its series' colours, not each one apart (test_report checks that on separated data)."""
    out, rep = run
    assert screenshot(out / "report.html", tmp_path / "page.png", 1200, 6000) == []
    assert assert_charts_draw((out / "report.html").read_text(), tmp_path, every_series=False) == 4 * len(rep["evaluations"]) + 1


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}], ids=["untied", "tied-biased"])
def test_float32_compute_is_bit_identical_to_a_float32_copy(overrides, tmp_path):
    """A bf16 checkpoint held in bf16 and upcast per use gives the logits and hidden states of the same
    checkpoint loaded in float32, bit for bit (torch.equal), at half the weight memory."""
    from conftest import make_base

    path = make_base(tmp_path / "base", seed=5, **overrides)
    lean = load_candidate(path, torch.device("cpu"))
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, full.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = lean(input_ids=ids, output_hidden_states=True), full(input_ids=ids, output_hidden_states=True)
    assert a.logits.dtype == torch.float32 and torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states, strict=True))
    weights = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert weights(lean) < 0.55 * weights(full)


def test_candidates_are_resident_one_at_a_time(tiny_base, tiny_adapter, tmp_path):
    """drift.evaluate builds a candidate only after the one before it is gone (weakref dead), and
    reports every candidate in the order given, the noise floor last."""
    import weakref

    reference = load_reference(tiny_base, load_mix((str(tiny_adapter),)), NF4Settings(), torch.device("cpu"))
    alive: list[weakref.ref] = []

    def build():
        assert all(r() is None for r in alive), "a candidate built while another is resident"
        model = load_candidate(tiny_base, torch.device("cpu"))
        alive.append(weakref.ref(model))
        return model

    windows = eval_windows(tiny_base)[:2]
    results = drift.evaluate(reference, {"a": build, "b": build, "c": build}, [windows, windows[:1]], "bfloat16", show_progress=False)
    assert len(alive) == 3 and [list(r["metrics"]) for r in results] == [["a", "b", "c", drift.NOISE_FLOOR]] * 2
    assert results[0]["metrics"]["a"]["kld_mean"] == results[0]["metrics"]["b"]["kld_mean"] > 0  # the same model scores the same


def test_nothing_of_verify_outlives_it(tiny_base, tiny_adapter, tmp_path):
    """A fresh process whose first GPTQModel import happens inside verify (through PEFT): afterwards
    no frame of verify is alive. GPTQModel keeps an optional dependency's ImportError at module level;
    its traceback used to pin verify's frames and their float32 model for the rest of the run."""
    script = f"""
import gc, sys, types, torch
from pathlib import Path
from qmerge.merge.adapter import load_mix
from qmerge.merge.streaming import merge
from qmerge.settings import NF4Settings
from qmerge.eval.verify import verify
assert "gptqmodel" not in sys.modules
mix = load_mix(({str(tiny_adapter)!r},))
merge(Path({str(tiny_base)!r}), mix, Path({str(tmp_path / 'merged')!r}), NF4Settings(), "bfloat16", torch.device("cpu"), show_progress=False)
assert verify(Path({str(tmp_path / 'merged')!r}), Path({str(tiny_base)!r}), mix, NF4Settings(), torch.device("cpu")).ok
assert "gptqmodel" in sys.modules
gc.collect()
alive = [f.f_code.co_name for f in gc.get_objects() if isinstance(f, types.FrameType) and f.f_code.co_filename.endswith("verify.py")]
assert not alive, alive
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_batched_evaluation_matches_one_window_at_a_time(tiny_base, tiny_adapter):
    """--eval-batch: three windows per forward give every number of one at a time (float32 GEMMs of
    another batch shape may round differently: 1e-6 relative), with the same per-window series."""
    reference = load_reference(tiny_base, load_mix((str(tiny_adapter),)), NF4Settings(), torch.device("cpu"))
    windows = eval_windows(tiny_base)[:5]
    build = {"merged": lambda: load_candidate(tiny_base, torch.device("cpu"))}
    one, three = (drift.evaluate(reference, build, [windows], "bfloat16", batch_size=b, show_progress=False)[0] for b in (1, 3))
    for name in ("merged", drift.NOISE_FLOOR):
        a, b = one["metrics"][name], three["metrics"][name]
        assert a["tokens"] == b["tokens"] == 5 * (SEQ - 1) and a["per_window"]["tokens"] == b["per_window"]["tokens"]
        for key in ("kld_mean", "ppl", "ppl_ref", "top1_agreement"):
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-12), (name, key, a[key], b[key])
        assert all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-12) for x, y in zip(a["per_window"]["kld"], b["per_window"]["kld"], strict=True))
