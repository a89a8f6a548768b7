"""`qmerge run` end to end on the tiny model (the shared run), and its bad-input behaviour."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import gptq_oracle, make_base, make_qlora_adapter, one_line_error, reference_model
from qmerge.eval.candidates import display_name
from qmerge.io import text
from qmerge.io.corpus import stdlib_part
from qmerge.settings import GPTQSettings


@pytest.fixture(scope="module")
def run_out(tiny_run) -> tuple[Path, dict]:
    return tiny_run.out, tiny_run.report


def test_layout_and_gptq_checkpoint(run_out):
    out, rep = run_out
    stages = ["drift", "gptq", "gptq-original", "manifests", "merged", "merged-original", "nf4"]
    assert sorted(p.name for p in out.iterdir()) == [*stages, "recipe.resolved.yaml", "report.html", "report.json", "report.md"]
    assert not list(out.glob(".*"))  # no partial stage left
    qc = json.loads((out / "gptq" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["pack_dtype"]) == (
        "gptq", "gptq", 4, 32, True, False, "int32",
    )
    model = AutoModelForCausalLM.from_pretrained(out / "gptq", dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.q_proj).__module__.startswith("gptqmodel")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 512, (2, 16))).logits).all()
    assert len(rep["gptq_log"]) == 14 and all(r["loss"] >= 0 for r in rep["gptq_log"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["schema_version"] == 2 and set(saved["stages"]) == {"nf4", "merged", "gptq", "merged-original", "gptq-original", "drift"}
    assert len(saved["inputs"]["base"]["sha256"]) == 64 and saved["versions"]["gptqmodel"].startswith("7.7")


def test_report_metrics_match_independent_recomputation(run_out, tiny_base, tiny_adapter):
    """Recompute the metrics here from the three models (the GPTQ checkpoint's weights in float32,
    dequantized by GPTQModel), with plain formulas (1e-4 rel)."""
    out, rep = run_out
    tok = AutoTokenizer.from_pretrained(tiny_base)
    windows = text.token_windows(stdlib_part("eval"), tok, 64, 6, "eval")
    inputs, targets = windows[:, :-1], windows[:, 1:]
    n_bytes = sum(len(tok.decode(w[1:].tolist()).encode()) for w in windows)

    def top5(lp):
        return lp.topk(5, dim=-1).indices.sort(dim=-1).values

    with torch.no_grad():
        ref = torch.log_softmax(reference_model(tiny_base, tiny_adapter)(inputs).logits.double(), -1)
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
        for name, model in (("merged (NF4 base + adapter)", merged), ("gptq 4-bit g32", gptq_oracle(out / "gptq"))):
            lp = torch.log_softmax(model(inputs).logits.double(), -1)
            kld = (ref.exp() * (ref - lp)).sum(-1).flatten()
            nll = -lp.gather(-1, targets.unsqueeze(-1)).flatten()
            nll_ref = -ref.gather(-1, targets.unsqueeze(-1)).flatten()
            expected = {
                "ppl": math.exp(nll.mean().item()),
                "ppl_ref": math.exp(nll_ref.mean().item()),
                "ppl_ratio": math.exp((nll - nll_ref).mean().item()),
                "kld_mean": kld.mean().item(),
                "kld_p99": torch.quantile(kld, 0.99).item(),
                "kld_max": kld.max().item(),
                "top1_agreement": (ref.argmax(-1) == lp.argmax(-1)).double().mean().item(),
                "kld_median": torch.quantile(kld, 0.5).item(),
                "kld_p90": torch.quantile(kld, 0.9).item(),
                "top5_agreement": (top5(ref) == top5(lp)).all(-1).double().mean().item(),
                "delta_p_mean": (torch.exp(-nll) - torch.exp(-nll_ref)).mean().item(),
                "nll_correlation": torch.corrcoef(torch.stack([nll, nll_ref]))[0, 1].item(),
                "bits_per_byte": nll.sum().item() / math.log(2) / n_bytes,
            }
            got = rep["evaluations"][0]["metrics"][name]
            for key, value in expected.items():
                assert math.isclose(got[key], value, rel_tol=1e-4, abs_tol=1e-12), (name, key, got[key], value)
    metrics = rep["evaluations"][0]["metrics"]
    merged = metrics["merged (NF4 base + adapter)"]
    assert merged["kld_mean"] <= 1e-3 and metrics["gptq 4-bit g32"]["kld_mean"] > merged["kld_mean"]
    original, base = (metrics[display_name(k, GPTQSettings(group_size=32))] for k in ("original", "base"))
    assert original["kld_mean"] > 100 * merged["kld_mean"] and base["kld_mean"] > original["kld_mean"]


def test_missing_adapter(tiny_base, tmp_path, cli):
    out = tmp_path / "out"
    one_line_error(cli("run", "--base", tiny_base, "--adapter", tmp_path / "nope", "--out", out), 2, "adapter", "does not exist")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_adapter_for_another_model(tiny_base, tmp_path, cli):
    other = make_base(tmp_path / "other", hidden_size=32, intermediate_size=64)
    adapter = make_qlora_adapter(other, tmp_path / "other-adapter")
    out = tmp_path / "out"
    one_line_error(cli("run", "--base", tiny_base, "--adapter", adapter, "--out", out), 2, "trained on another model")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_non_empty_out_needs_overwrite(tiny_base, tiny_adapter, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    one_line_error(cli("run", "--base", tiny_base, "--adapter", tiny_adapter, "--out", out), 2, "--overwrite")
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "mine"


def test_group_size_that_does_not_divide_is_refused_up_front(tiny_base, tiny_adapter, tmp_path, cli):
    result = cli("run", "--base", tiny_base, "--adapter", tiny_adapter, "--out", tmp_path / "o", "--group-size", "128")
    one_line_error(result, 2, "in_features 64", "--group-size 64")


SHARED_WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


@pytest.mark.skipif(not SHARED_WIKITEXT.exists(), reason="../shared/data/wikitext-2 is not beside this checkout")
def test_local_wikitext_preset_gives_disjoint_windows(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    calibration = text.windows("wikitext2-local", "calibration", tok, 128, 64)
    evaluation = text.windows("wikitext2-local", "eval", tok, 128, 64)
    assert calibration.shape == evaluation.shape == (64, 128)
    text.check_disjoint(calibration, evaluation)
    assert tok.decode(evaluation[0][:40]).strip().startswith("= Robert")  # the test split's first article


def test_every_preset_declares_its_kind():
    import tomllib

    for path in text.PRESETS.glob("*.toml"):
        assert tomllib.loads(path.read_text())["kind"] in ("stdlib", "hub", "file"), path
