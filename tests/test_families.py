"""`qmerge run` with default settings on every common architecture (tests/families.py): the merged
checkpoint against PEFT's QLoRA model (the oracle on bitsandbytes' own values), the GPTQ checkpoint
in the loader a user would use, finite and better than RTN, the report written and strict JSON.

The matrix runs GPTQ and every default row per family (tens of seconds each): slow tier. The fast
tier keeps one cheap representative: the MoE family with --skip-gptq (experts fused at load, so
verify's tensor check must key by the checkpoint's names)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import mean_kld, reference_model, strict_report
from conftest import one_line_error
from families import FAMILIES, UNKNOWN_TO_GPTQMODEL, make_family
from qmerge.io import text

SMALL = ("--seq-len", "64", "--calibration-samples", "16", "--eval-samples", "6", "--device", "cpu")


def merged_kld(base, adapter, merged) -> float:
    """Mean KLD of DIR/merged (bf16) against PEFT's QLoRA model on 4 eval windows."""
    windows = text.windows("stdlib", "eval", AutoTokenizer.from_pretrained(base), 64, 4)
    with torch.no_grad():
        ref = reference_model(base, adapter)(windows).logits
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(windows).logits
    return mean_kld(ref, got)


def gptq_runs_in_users_loader(gptq, moe: bool) -> None:
    """transformers loads it without a missed or ignored tensor and runs it; a fused-expert MoE
    checkpoint, which transformers 5 cannot hold, through GPTQModel.load."""
    tokens = torch.randint(3, 500, (1, 24))
    if moe:
        from qmerge.models.engine import gptqmodel, transformers_unpatched

        with transformers_unpatched("qwen2_moe"):  # as in a user's own process: GPTQModel's class patches stay out of later tests
            model = gptqmodel().GPTQModel.load(str(gptq), device="cpu").model
    else:
        model, info = AutoModelForCausalLM.from_pretrained(gptq, dtype=torch.float32, output_loading_info=True)
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()


def check_family(name, tmp_path, cli, *extra) -> tuple[dict, str]:
    base, adapter = make_family(name, tmp_path)
    out = tmp_path / "out"
    result = cli("run", "--base", base, "--adapter", adapter, "--out", out, *SMALL, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    rep = strict_report(out / "report.json")
    assert rep["merge"]["verify"]["ok"]
    assert rep["inputs"]["windows_start_with_bos"] is {**FAMILIES, **UNKNOWN_TO_GPTQMODEL}[name][1]
    kld = merged_kld(base, adapter, out / "merged")
    assert kld <= 1e-3, kld  # bf16 storage
    return rep, result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_family_end_to_end(name, tmp_path, cli):
    rep, printed = check_family(name, tmp_path, cli)
    assert "group size auto → 64" in printed
    moe = name == "qwen2_moe"
    metrics = rep["evaluations"][0]["metrics"]
    gptq, rtn = (metrics[n]["kld_mean"] for n in ("gptq 4-bit g64", "rtn 4-bit g64"))
    assert 0 < gptq < rtn, (gptq, rtn)
    assert rep["settings"]["gptq"]["group_size"] == 64 and rep["settings"]["gptq"]["group_size_auto"]  # 64 divides 64 and 128, 128 does not
    assert "group-size: 64" in (tmp_path / "out" / "recipe.resolved.yaml").read_text()
    assert rep["servers"]["transformers"]["loads"] is not moe
    if moe:  # the run's GPTQ stage (in this process: the cli fixture) left transformers' MoE classes as they were
        import transformers.modeling_utils
        from transformers.models.qwen2_moe import modeling_qwen2_moe

        assert modeling_qwen2_moe.Qwen2MoeSparseMoeBlock.__module__ == modeling_qwen2_moe.__name__
        assert not hasattr(transformers.modeling_utils, "get_checkpoint_conversion_mapping")
    gptq_runs_in_users_loader(tmp_path / "out" / "gptq", moe)
    assert all(c["compute_dtype"] == "float32" for n, c in rep["candidates"].items() if c["kind"] != "noise-floor")


def test_moe_merge_without_gptq(tmp_path, cli):
    """Qwen2-MoE: verify's tensor check lines up with the checkpoint's per-expert tensors (transformers
    5 fuses them at load), and the bits per weight are over the layers GPTQ would quantize (the
    experts included, the router and shared-expert gate not)."""
    rep, _ = check_family("qwen2_moe", tmp_path, cli, "--skip-gptq", "--candidates", "merged", "--eval-samples", "2", "--calibration-samples", "2")
    worst = rep["merge"]["verify"]["worst"]
    assert worst[0]["of_tolerance"] <= 1 and rep["merge"]["verify"]["modules"] > 40
    assert rep["candidates"]["merged (NF4 base + adapter)"]["bits_per_weight"] == pytest.approx(16, abs=0.1)


def test_architecture_gptqmodel_does_not_know_is_refused_before_any_work(tmp_path, cli):
    """GPTQ of an architecture without a GPTQModel definition: exit 2, one line naming it and the way
    out, before any stage."""
    base, adapter = make_family("helium", tmp_path)
    out = tmp_path / "out"
    one_line_error(cli("run", "--base", base, "--adapter", adapter, "--out", out, *SMALL), 2, "'helium'", "no model definition", "--skip-gptq")
    assert not out.exists()


@pytest.mark.slow
def test_architecture_gptqmodel_does_not_know_merges_with_skip_gptq(tmp_path, cli):
    """--skip-gptq: merged and measured, bits per weight over the layers bitsandbytes quantized."""
    rep, _ = check_family("helium", tmp_path, cli, "--skip-gptq", "--candidates", "merged")
    assert rep["candidates"]["merged (NF4 base + adapter)"]["bits_per_weight"] == pytest.approx(16)
