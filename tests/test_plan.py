"""The memory plan against measurement: on two random-weight Llamas, every stage's estimated peak on
CPU (report.json `plan`) is within ±25% of the peak resident set its worker process reached
(report.json `stages`); and a plan that cannot fit is refused before anything is written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import make_tokenizer, one_line_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchlib  # noqa: E402

SIZES = {"4x768x2048": 4, "12x1024x2816": 12}
ARGS = ["--seq-len", "64", "--eval-samples", "2", "--calibration-samples", "4", "--group-size", "64", "--device", "cpu",
        "--candidates", "merged,original,peft-nf4,rtn,gptq,base"]


def config(shape: str) -> dict:
    layers, hidden, intermediate = (int(x) for x in shape.split("x"))
    return dict(vocab_size=4096, hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                num_hidden_layers=layers, tie_word_embeddings=False, max_position_embeddings=256)


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SIZES))
def test_plan_is_within_a_quarter_of_each_stage_peak(shape, tmp_path):
    base, adapter, tokenizer, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "tokenizer", tmp_path / "out"
    try:
        make_tokenizer(tokenizer, 4096)
        benchlib.make_random_model(base, config(shape), adapter, tokenizer_from=tokenizer)
        benchlib.run_child([*benchlib.python(), "-m", "qmerge.cli", "run", "--base", str(base), "--adapter", str(adapter), "--out", str(out), *ARGS])
        rep = json.loads((out / "report.json").read_text())
        ratios = {name: rep["plan"]["stages"][name]["peak_mb"]["cpu"] / stage["peak_rss_mb"] for name, stage in rep["stages"].items()}
        print(shape, {name: (stage["peak_rss_mb"], rep["plan"]["stages"][name]["parts_mb"]["cpu"]) for name, stage in rep["stages"].items()})
        assert set(ratios) == {"nf4", "merged", "gptq", "drift"}
        assert all(0.75 <= r <= 1.25 for r in ratios.values()), ratios
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_plan_that_cannot_fit_is_refused_in_one_line(tiny_base, tiny_adapter, tmp_path, cli, monkeypatch):
    """Less memory than the drift stage needs even streamed: one line naming the stage and the fixes,
    exit 2, no --out left behind."""
    from qmerge.io import memory

    monkeypatch.setattr(memory, "_cgroup_limit", lambda: 64 * 2**20)
    result = cli("run", "--base", tiny_base, "--adapter", tiny_adapter, "--out", tmp_path / "out", "--skip-gptq", "--seq-len", "64", "--eval-samples", "2")
    one_line_error(result, 2, "memory plan: the", "stage needs", "GB on cpu", "available")
    assert not (tmp_path / "out").exists()
