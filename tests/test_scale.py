"""Scale: a whole `qmerge run --skip-gptq` (the base quantized once, merge, verify, drift) on a model
whose 16-bit checkpoint is larger than the memory the run may use, inside a cgroup limit: the memory
plan streams the 16-bit candidates a layer at a time, nothing is OOM-killed, and every number equals
an unlimited run's (candidates resident)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import make_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchlib  # noqa: E402

# 72 layers of width 1024: ~920M parameters, 1.85 GB of bf16, a small vocabulary so that the layers are
# the model. A forked stage worker starts from its parent's ~470 MB of imports; the 4-bit reference
# holds ~0.45 GB; a streamed candidate one module (the memory plan's arithmetic, qmerge.plan).
MODEL = dict(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=72,
             tie_word_embeddings=False, max_position_embeddings=256)
LIMIT = 1536 * 2**20
ARGS = ["--skip-gptq", "--candidates", "merged,original,base", "--seq-len", "32", "--eval-samples", "2", "--calibration-samples", "2", "--device", "cpu"]


def qmerge_run(base: Path, adapter: Path, out: Path, *extra: str, cgroup=None) -> dict:
    benchlib.run_child([*benchlib.python(), "-m", "qmerge.cli", "run", "--base", str(base), "--adapter", str(adapter), "--out", str(out), *ARGS, *extra], cgroup=cgroup)
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="the drift worker is OOM-killed under the 1.5 GB limit though the plan estimates 1.27 GB for it (2026-11-30; its fork base is 0.72 GB now, 0.47 GB when this test was written; issue 15 stays open)")
@pytest.mark.skipif(benchlib.memory_cgroup_root() is None, reason="needs a writable cgroup v1 memory controller (/sys/fs/cgroup/memory), i.e. root on a cgroup v1 host")
def test_run_on_a_model_larger_than_the_memory_limit(tmp_path):
    base, adapter, tokenizer = tmp_path / "base", tmp_path / "adapter", tmp_path / "tokenizer"
    try:
        make_tokenizer(tokenizer, MODEL["vocab_size"])
        benchlib.make_random_model(base, MODEL, adapter, tokenizer_from=tokenizer, r=4)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        assert size > 1.1 * LIMIT
        unlimited = qmerge_run(base, adapter, tmp_path / "unlimited", "--stream", "never")
        with benchlib.memory_limited(LIMIT) as (cgroup, stats):
            limited = qmerge_run(base, adapter, tmp_path / "limited", cgroup=cgroup)
        print(f"model {size / 2**20:.0f} MiB on disk; cgroup {stats}; plan {json.dumps(limited['plan']['stages'])}; stages {limited['stages']}")
        assert stats["oom_kill"] == 0 and stats["max_usage_mb"] * 2**20 <= LIMIT
        assert limited["plan"]["stream"] == "disk" and unlimited["plan"]["stream"] is None
        assert limited["evaluations"] == unlimited["evaluations"]
        assert limited["merge"]["verify"] == unlimited["merge"]["verify"] and limited["merge"]["verify"]["ok"]
        assert benchlib.tree_digest(tmp_path / "limited" / "merged") == benchlib.tree_digest(tmp_path / "unlimited" / "merged")
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # 5 GB that pytest would otherwise keep
