"""`qmerge merge`, `qmerge quantize`, `qmerge eval`: the run's stages one at a time, on the tiny model.
Their outputs equal the shared run's stage outputs (bytes, manifest keys, metrics), a checkpoint made
elsewhere is scored beside them, and bad input is refused in one line with exit status 2, leaving
nothing behind. The API functions are the same code path with the same defaults and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import qmerge
from conftest import SMALL_RUN, make_base, make_qlora_adapter, one_line_error
from qmerge import cli as cli_module
from qmerge import commands, recipe
from qmerge.errors import QmergeError
from qmerge.quant.gptq import read_quant_log

FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL_RUN.items()]


def manifest(out: Path, stage: str) -> dict:
    return json.loads((out / "manifests" / f"{stage}.json").read_text())


def same_stage(a: Path, b: Path, stage: str) -> None:
    """Stage `stage` of runs a and b: the same manifest key and the same bytes in every file it lists
    (GPTQModel's per-module log, which holds timings, the same losses)."""
    ma, mb = manifest(a, stage), manifest(b, stage)
    assert ma["key"] == mb["key"], (ma["produced_by"], mb["produced_by"])
    logs = {"quant_log.csv"}
    digests = lambda m: {k: v["sha256"] for k, v in m["files"].items() if k not in logs}  # noqa: E731 (size and mtime are the file's own)
    assert digests(ma) == digests(mb) and set(ma["files"]) == set(mb["files"])
    if "quant_log.csv" in ma["files"]:  # rows in the order GPTQModel's workers finished them
        assert sorted(read_quant_log(a / stage), key=str) == sorted(read_quant_log(b / stage), key=str)


@pytest.fixture(scope="module")
def staged(tiny_run, tiny_base, tiny_adapter, tmp_path_factory) -> Path:
    """`qmerge merge` then `qmerge quantize` into one directory, as on two machines (nothing but the
    directory passes between them), with the shared run's settings."""
    out = tmp_path_factory.mktemp("staged") / "out"
    assert cli_module.main(["merge", "--base", str(tiny_base), "--adapter", str(tiny_adapter), "--out", str(out), "--quiet"]) == 0
    moved = tmp_path_factory.mktemp("machine-b") / "out"
    shutil.copytree(out, moved)
    assert cli_module.main(["quantize", "--out", str(moved), "--quiet", *(f for f in FLAGS if "eval" not in f)]) == 0
    return moved


def test_merge_and_quantize_equal_the_runs_stages(staged, tiny_run):
    assert sorted(p.name for p in staged.iterdir()) == ["gptq", "manifests", "merged", "nf4"]  # DIR/nf4: the base as trained, which the merge read
    same_stage(staged, tiny_run.out, "merged")  # verified by PEFT on the way, as in run
    assert manifest(staged, "merged")["info"]["verify"]["ok"]
    same_stage(staged, tiny_run.out, "gptq")  # the same key: `qmerge run --resume` would reuse both


def test_eval_equals_the_runs_drift_and_scores_a_checkpoint_made_elsewhere(staged, tiny_run, tiny_base, tiny_adapter, tmp_path, cli):
    """`qmerge eval` of the staged directory, with a copy of its GPTQ checkpoint passed as one made
    elsewhere: the rows equal the shared run's on the same eval set, and the copy equals gptq's row."""
    out = tmp_path / "out"
    shutil.copytree(staged, out)
    shutil.copytree(staged / "gptq", tmp_path / "theirs")
    result = cli("eval", "--base", tiny_base, "--adapter", tiny_adapter, "--out", out, "--candidates", "merged,gptq", "--checkpoint", f"theirs={tmp_path / 'theirs'}",
                 "--eval", "stdlib", "--samples", "1", "--json", "--quiet", *(f for f in FLAGS if "group" not in f))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["final"]["name"] == "gptq 4-bit g32" and summary["gptq"] == str(out / "gptq") and result.stderr == ""
    rep = json.loads((out / "report.json").read_text())
    ours, theirs = rep["evaluations"][0], tiny_run.report["evaluations"][0]
    assert ours["windows_sha256"] == theirs["windows_sha256"]
    for name in ("merged (NF4 base + adapter)", "gptq 4-bit g32"):
        for key in ("kld_mean", "ppl", "ppl_ratio", "top1_agreement", "kld_p99"):
            assert ours["metrics"][name][key] == pytest.approx(theirs["metrics"][name][key], rel=1e-9, abs=1e-15), (name, key)
    for key in ("kld_mean", "ppl_ratio", "top1_agreement"):
        assert ours["metrics"]["theirs"][key] == ours["metrics"]["gptq 4-bit g32"][key]
    assert rep["candidates"]["theirs"] == {**rep["candidates"]["gptq 4-bit g32"], "kind": "checkpoint", "path": str(tmp_path / "theirs")}
    assert rep["merge"]["verify"]["ok"] and rep["settings"]["gptq"]["group_size"] == 32  # from the stage manifest; the grid from gptq/
    assert (out / "report.html").exists() and (out / "report.md").read_text().count("| theirs |") == 3  # drift, detail and layer tables


@pytest.mark.slow
def test_eval_of_checkpoints_made_elsewhere_only(tiny_run, tiny_base, tiny_adapter, tmp_path, cli):
    """No merge or GPTQ of ours: the checkpoint given is the final one, budgets apply to it."""
    result = cli("eval", "--base", tiny_base, "--adapter", tiny_adapter, "--out", tmp_path / "out", "--checkpoint", f"their-gptq={tiny_run.gptq}",
                 "--candidates", "base", "--eval", "stdlib", "--samples", "0", "--max-kld", "1e-12", "--quiet", *FLAGS)
    assert result.returncode == 3, result.stderr[-2000:]
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["final"] == "their-gptq" and set(rep["evaluations"][0]["metrics"]) == {"their-gptq", "base without adapter (the fine-tune's own effect)", "noise floor (reference @ training compute dtype)"}
    assert rep["evaluations"][0]["metrics"]["their-gptq"]["kld_mean"] == pytest.approx(tiny_run.report["evaluations"][0]["metrics"]["gptq 4-bit g32"]["kld_mean"], rel=1e-9)
    assert not rep["budgets"]["max_kld"]["ok"] and "samples" not in rep


def test_stage_commands_refuse_bad_input(tiny_base, tiny_adapter, tmp_path, cli):
    out = tmp_path / "out"
    one_line_error(cli("merge", "--base", tiny_base, "--adapter", tmp_path / "nope", "--out", out), 2, "adapter", "does not exist")
    one_line_error(cli("quantize", "--out", out), 2, str(out / "merged"), "qmerge merge")
    one_line_error(cli("eval", "--base", tiny_base, "--adapter", tiny_adapter, "--out", out), 2, "no merged/ or gptq/", "--checkpoint")
    one_line_error(cli("eval", "--base", tiny_base, "--adapter", tiny_adapter, "--out", out, "--checkpoint", f"x={tmp_path / 'none'}"), 2, "checkpoint x", "does not exist")
    exl3 = tmp_path / "exl3"
    exl3.mkdir()
    (exl3 / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "exl3"}}))
    one_line_error(cli("eval", "--base", tiny_base, "--adapter", tiny_adapter, "--out", out, "--checkpoint", f"x={exl3}"), 2, "checkpoint x is quantized with exl3")
    one_line_error(cli("merge", "--adapter", tiny_adapter, "--out", out), 2, "--base is required")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_eval_refuses_a_grid_its_gptq_checkpoint_was_not_made_on(staged, tiny_base, tiny_adapter, tmp_path, cli):
    result = cli("eval", "--base", tiny_base, "--adapter", tiny_adapter, "--out", staged, "--group-size", "64")
    one_line_error(result, 2, "group_size=32", "--group-size 64")


def test_api_and_cli_share_defaults_and_errors(tiny_base, tiny_adapter, tmp_path, cli):
    """Each stage command's options are its API function's settings, resolved by the same code to the
    same defaults; the same bad input gives the same message from both."""
    parser = cli_module.build_parser()
    for command, keys in (("merge", commands.MERGE_KEYS), ("quantize", commands.QUANTIZE_KEYS), ("eval", commands.EVAL_KEYS)):
        sub = parser._subparsers._group_actions[0].choices[command]
        flags = {a.dest for a in sub._actions} & set(recipe.KEYS)
        assert flags - {"base", "adapter", "out"} == set(keys), (command, set(keys) ^ (flags - {"base", "adapter", "out"}))
        args = parser.parse_args([command, "--out", "o"])
        from_cli = commands.settings_of(command, keys, {"base": "b", "adapter": ["a"], **commands.only(cli_module.run_values(args), keys)})
        from_api = commands.settings_of(command, keys, {"base": "b", "adapter": "a", "out": "o"})
        assert from_cli == from_api
        assert from_api.data == recipe.to_settings({"base": "b", "adapter": "a", "out": "o"}).data  # the run's defaults
    bad = {"merge": (["--merged-dtype", "float8"], dict(merged_dtype="float8")), "quantize": (["--bits", "5"], dict(bits=5))}
    for command, (flags, settings) in bad.items():
        line = one_line_error(cli(command, *(["--base", tiny_base, "--adapter", tiny_adapter] if command == "merge" else []), "--out", tmp_path / "o", *flags), 2)
        call = qmerge.merge_adapter if command == "merge" else qmerge.gptq_quantize
        first = (str(tiny_base), str(tiny_adapter), tmp_path / "o" / "merged") if command == "merge" else (tmp_path / "o" / "merged", tmp_path / "o" / "gptq")
        with pytest.raises(QmergeError) as e:
            call(*first, **settings)
        assert line == f"qmerge: error: {e.value}"
    with pytest.raises(QmergeError, match="unknown setting 'bits' for merge"):
        qmerge.merge_adapter(str(tiny_base), str(tiny_adapter), tmp_path / "o", bits=4)


@pytest.mark.slow
def test_eval_of_an_awq_checkpoint(tmp_path, cli):
    """An AWQ checkpoint of the same fine-tune (GPTQModel's AWQ, which transformers loads here through
    it) scored against the QLoRA model beside our own merge. AWQ's clipping search needs output
    widths divisible by 64, hence a wider tiny model."""
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    from qmerge.io import text

    base = make_base(tmp_path / "base", hidden_size=128, intermediate_size=256)
    adapter = make_qlora_adapter(base, tmp_path / "adapter")
    out = tmp_path / "out"
    qmerge.merge_adapter(str(base), str(adapter), out / "merged", device="cpu")
    windows = text.windows("stdlib", "calibration", AutoTokenizer.from_pretrained(base), 64, 16)
    model = GPTQModel.load(str(out / "merged"), QuantizeConfig(bits=4, group_size=32, quant_method="awq", format="gemm"), device="cpu")
    model.quantize([{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in windows], batch_size=1)
    model.save(str(tmp_path / "awq"))
    result = cli("eval", "--base", base, "--adapter", adapter, "--out", out, "--checkpoint", f"awq={tmp_path / 'awq'}", "--eval", "stdlib", "--samples", "1", "--quiet", *FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    awq, merged = (rep["evaluations"][0]["metrics"][n] for n in ("awq", "merged (NF4 base + adapter)"))
    assert rep["final"] == "merged (NF4 base + adapter)" and rep["candidates"]["awq"]["kind"] == "checkpoint"
    assert merged["kld_mean"] < awq["kld_mean"] < 0.1 and 4 < rep["candidates"]["awq"]["bits_per_weight"] < 5.5, (awq, merged)
