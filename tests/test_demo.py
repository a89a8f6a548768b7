"""End to end on the embedded SmolLM2-135M-Instruct: `qmerge demo` as a user runs it (smaller eval
and calibration sets than the default, same code path). Several minutes on 2 CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "QMERGE_CACHE": os.environ.get("QMERGE_CACHE", str(tmp_path / "cache"))}
    args = ["--out", str(out), "--calibration-samples", "32", "--eval-samples", "8", "--seq-len", "256"]
    result = subprocess.run([sys.executable, "-m", "qmerge.cli", "demo", *args], capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"GPTQ checkpoint:   {out / 'gptq'}" in result.stdout
    rep = json.loads((out / "report.json").read_text())
    merged = rep["metrics"]["merged (NF4 base + adapter)"]
    gptq = rep["metrics"]["gptq 4-bit g64"]
    floor = next(v for k, v in rep["metrics"].items() if k.startswith("noise floor"))
    # the NF4 merge stored in bf16 stays within the bound of the model as trained ...
    assert merged["kld_mean"] <= 1e-3 and merged["top1_agreement"] >= 0.97, merged
    # ... and GPTQ 4-bit costs clearly more than the merge, and than bf16 compute does
    assert gptq["kld_mean"] > 5 * merged["kld_mean"] and gptq["kld_mean"] > floor["kld_mean"], (gptq, merged, floor)
    assert 0.9 < gptq["ppl_ratio"] < 1.5
    # merging into the original 16-bit weights drifts far more than the NF4 merge (the point of qmerge)
    original = next(v for k, v in rep["metrics"].items() if k.startswith("merged into original"))
    assert original["kld_mean"] > 10 * merged["kld_mean"], (original, merged)
    assert rep["merge"] == {"nf4_modules": 210, "lora_modules": 210, "tensors": 272, "untied_embeddings": False}
