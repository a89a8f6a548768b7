"""End to end on the embedded SmolLM2-135M-Instruct: `qmerge demo` as a user runs it (smaller eval
and calibration sets than the default, same code path), then one small 3-bit run of the two rows on
the GPTQ grid. Several minutes on 2 CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SMALL = ["--calibration-samples", "32", "--eval-samples", "8", "--seq-len", "256"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """$QMERGE_CACHE, or one fresh cache for both tests (the demo base and adapter are built once)."""
    return os.environ.get("QMERGE_CACHE") or str(tmp_path_factory.mktemp("qmerge-cache"))


def demo(out, cache: str, *args: str) -> dict:
    env = {**os.environ, "QMERGE_CACHE": cache}
    result = subprocess.run([sys.executable, "-m", "qmerge.cli", "demo", "--out", str(out), *args], capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"GPTQ checkpoint:   {out / 'gptq'}" in result.stdout
    return json.loads((out / "report.json").read_text())


def by_kind(rep: dict) -> dict[str, dict]:
    metrics = rep["evaluations"][0]["metrics"]
    return {c["kind"]: {**metrics[name], **c} for name, c in rep["candidates"].items()}


def floor_row(rep: dict) -> set[str]:
    """The demo adapter trains in float32 on a CPU without native bf16 (then no noise floor), in bf16 elsewhere."""
    return {"noise-floor"} if rep["settings"]["nf4"]["compute_dtype"] == "bfloat16" else set()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, cache):
    rep = demo(tmp_path / "demo", cache, *SMALL)
    m = by_kind(rep)
    merged, gptq, original = m["merged"], m["gptq"], m["original"]
    assert rep["final"] == "gptq 4-bit g64" and set(m) == {"merged", "original", "peft-nf4", "rtn", "gptq", "base", *floor_row(rep)}
    # the NF4 merge stored in bf16 stays within the bound of the model as trained ...
    assert merged["kld_mean"] <= 1e-3 and merged["top1_agreement"] >= 0.97, merged
    # ... and GPTQ 4-bit costs clearly more than the merge, and than bf16 compute does
    assert gptq["kld_mean"] > 5 * merged["kld_mean"] and gptq["kld_mean"] > m.get("noise-floor", {"kld_mean": 0})["kld_mean"], (gptq, merged)
    assert 0.9 < gptq["ppl_ratio"] < 1.5
    # merging into the original 16-bit weights drifts far more than the NF4 merge (the point of qmerge)
    assert original["kld_mean"] > 10 * merged["kld_mean"], (original, merged)
    # GPTQ's error compensation beats round-to-nearest on the same 4-bit grid (the GPTQ paper's result)
    assert gptq["kld_mean"] < m["rtn"]["kld_mean"], (gptq, m["rtn"])
    # sizes: bf16 is 16 bits; 4-bit g64 adds an fp16 scale and a 4-bit zero per 64 weights (+ g_idx);
    # NF4 adds a uint8 absmax per 64 (+ double-quant statistics), less than GPTQ's overhead; the same
    # format costs the same bytes
    assert merged["bits_per_weight"] == 16.0 and 4.31 < gptq["bits_per_weight"] < 4.4 and 4.125 < m["peft-nf4"]["bits_per_weight"] < 4.2
    assert m["peft-nf4"]["size_bytes"] < m["rtn"]["size_bytes"] == gptq["size_bytes"] < merged["size_bytes"]
    assert len(rep["evaluations"][0]["layers"]["gptq 4-bit g64"]) == 30 and len(rep["gptq_log"]) == 210
    verify = rep["merge"].pop("verify")  # the merge stage's own check against PEFT's merge and logits
    assert rep["merge"] == {"nf4_modules": 210, "lora_modules": 210, "tensors": 272, "untied_embeddings": False}
    assert verify["ok"] and verify["modules"] == 272 and verify["kld_mean"] <= 1e-3, verify


@pytest.mark.slow
def test_demo_gptq_beats_rtn_at_3_bits(tmp_path, cache):
    """Only the two rows on the 3-bit grid, on fewer windows: the cheapest run that shows it."""
    rep = demo(tmp_path / "demo3", cache, "--bits", "3", "--candidates", "rtn,gptq", "--calibration-samples", "16", "--eval-samples", "4", "--seq-len", "256")
    m = by_kind(rep)
    assert set(m) == {"rtn", "gptq", *floor_row(rep)} and rep["final"] == "gptq 3-bit g64"
    assert m["gptq"]["kld_mean"] < m["rtn"]["kld_mean"], (m["gptq"], m["rtn"])
    assert m["rtn"]["size_bytes"] == m["gptq"]["size_bytes"] and 3.3 < m["gptq"]["bits_per_weight"] < 3.4
