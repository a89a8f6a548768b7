"""Bases: a pre-quantized bitsandbytes 4-bit checkpoint merges to exactly what the 16-bit base + the
training settings give; other quantizations and impossible combinations are refused by name; a
plain LoRA merges into the original weights against its own oracle; `qmerge verify` passes a good
merge and fails a tampered one with exit status 4."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from conftest import mean_kld, one_line_error, reference_model
from qmerge import pipeline
from qmerge.prepare import prepare
from qmerge.merge.adapter import load_adapter
from qmerge.io.checkpoint import LazyCheckpoint
from qmerge.io.inputs import load_base_config
from qmerge.merge.streaming import merge
from qmerge.merge.nf4 import bnb_config
from qmerge.merge.source import as_trained, effective_settings
from qmerge.settings import DataSettings, NF4Settings, RunSettings

CPU = torch.device("cpu")
RUN = dict(skip_gptq=True, data=DataSettings(calibration_samples=4, eval_samples=4, seq_len=64))


def save_quantized(base: Path, out: Path, config: BitsAndBytesConfig) -> Path:
    """What a `*-bnb-4bit` (or 8-bit) repository is: a bitsandbytes load of the base, save_pretrained,
    with its tokenizer. (No inference forward before saving: on AVX512-BF16 CPUs bitsandbytes 0.50
    repacks the layers then, and save_pretrained writes its lossy inverse: bf16-rounded scales.)"""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, quantization_config=config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    ckpt = LazyCheckpoint.open(directory)
    return {k: ckpt.get(k) for k in ckpt.keys()}


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_prequantized_base_merges_like_the_16bit_base(tiny_base, tiny_adapter, tmp_path, quant_type, double_quant):
    """torch.equal on every tensor, float32 output (no rounding to hide a difference)."""
    nf4 = NF4Settings(quant_type=quant_type, double_quant=double_quant)
    pre = save_quantized(tiny_base, tmp_path / "pre", bnb_config(nf4))
    stored = LazyCheckpoint.open(pre)
    assert any(k.endswith(f"quant_state.bitsandbytes__{quant_type}") for k in stored.keys())
    assert any(k.endswith(".nested_absmax") for k in stored.keys()) == double_quant
    config = load_base_config(pre)
    source = as_trained(pre, config, NF4Settings())
    assert effective_settings(config, source, NF4Settings(), ()) == nf4  # the checkpoint decides, defaults given nothing
    assert sorted(source.keys()) == sorted(LazyCheckpoint.open(tiny_base).keys())  # aux tensors hidden
    adapter = load_adapter(tiny_adapter)
    result = merge(pre, adapter, tmp_path / "from-pre", NF4Settings(), "float32", CPU, show_progress=False)
    merge(tiny_base, adapter, tmp_path / "from-16bit", nf4, "float32", CPU, show_progress=False)
    assert result.nf4_modules == 14 and result.lora_modules == 14
    ours, expected = tensors(tmp_path / "from-pre"), tensors(tmp_path / "from-16bit")
    assert ours.keys() == expected.keys()
    for key in expected:
        assert torch.equal(ours[key], expected[key]), key
    assert "quantization_config" not in json.loads((tmp_path / "from-pre" / "config.json").read_text())


@pytest.fixture(scope="module")
def prequantized(tiny_base, tmp_path_factory) -> Path:
    return save_quantized(tiny_base, tmp_path_factory.mktemp("pre") / "base-bnb-4bit", bnb_config(NF4Settings()))


def test_run_on_prequantized_base_reports_it(tiny_base, tiny_adapter, prequantized, tmp_path):
    """Same drift as on the 16-bit base (same reference, same merged weights); no "original" row,
    and the report says why."""
    on_pre = pipeline.run(RunSettings(base=str(prequantized), adapter=str(tiny_adapter), out=tmp_path / "pre", **RUN), echo=False)
    on_16 = pipeline.run(RunSettings(base=str(tiny_base), adapter=str(tiny_adapter), out=tmp_path / "16", **RUN), echo=False)
    name = "merged (NF4 base + adapter)"
    assert on_pre["inputs"]["base"]["prequantized"] and not on_16["inputs"]["base"]["prequantized"]
    pre, sixteen = on_pre["evaluations"][0]["metrics"], on_16["evaluations"][0]["metrics"]
    assert pre[name]["kld_mean"] == pytest.approx(sixteen[name]["kld_mean"], rel=1e-6, abs=1e-12)
    assert pre[name]["kld_mean"] <= 1e-3
    assert "original" not in on_pre["settings"]["candidates"] and "original" in on_16["settings"]["candidates"]
    assert on_pre["merge"]["verify"]["ok"] and on_pre["reference"] == {"name": "reference (QLoRA as trained)", "kind": "qlora"}
    assert 'no "merged into original" row' in (tmp_path / "pre" / "report.md").read_text()
    assert tensors(tmp_path / "pre" / "merged").keys() == tensors(tmp_path / "16" / "merged").keys()


def with_quantization_config(base: Path, out: Path, quantization_config: dict) -> Path:
    """A copy of the base whose config.json declares another quantization (the refusal reads the config)."""
    shutil.copytree(base, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return out


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False, "format": "gptq", "checkpoint_format": "gptq"}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


@pytest.mark.parametrize(
    "case, words",
    [
        ("bnb-8bit", ["already quantized (bitsandbytes 8-bit)"]),
        ("gptq", ["already quantized (gptq)"]),
        ("awq", ["already quantized (awq)"]),
        ("conflicting", ["--quant-type 'fp4' conflicts with the pre-quantized base's 'nf4'", "drop --quant-type"]),
        ("conflicting-blocksize", ["--nf4-blocksize 128 conflicts with the pre-quantized base's 64"]),
        ("original-of-prequantized", ["pre-quantized 4-bit checkpoint", "no original 16-bit weights", "--merge-into nf4"]),
    ],
)
def test_refusals(tiny_base, tiny_adapter, prequantized, tmp_path, case, words, cli):
    base, extra = prequantized, []
    if case == "bnb-8bit":
        base = save_quantized(tiny_base, tmp_path / "q8", BitsAndBytesConfig(load_in_8bit=True))
    elif case in ("gptq", "awq"):
        base = with_quantization_config(tiny_base, tmp_path / case, GPTQ if case == "gptq" else AWQ)
    else:
        extra = {"conflicting": ["--quant-type", "fp4"], "conflicting-blocksize": ["--nf4-blocksize", "128"], "original-of-prequantized": ["--merge-into", "original"]}[case]
    out = tmp_path / "out"
    one_line_error(cli("run", "--base", base, "--adapter", tiny_adapter, "--out", out, "--group-size", "32", *extra), 2, *words)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_agreeing_settings_are_accepted(tiny_adapter, prequantized, tmp_path):
    """Settings that repeat the checkpoint's (as recipe.resolved.yaml writes them) are not a conflict."""
    resolved = prepare(RunSettings(
        base=str(prequantized), adapter=str(tiny_adapter), out=tmp_path / "o", nf4=NF4Settings(compute_dtype="bfloat16"),
        nf4_given=("quant_type", "double_quant", "blocksize", "compute_dtype", "quant_storage", "skip_modules"), **RUN,
    ))
    assert resolved.prequantized and resolved.nf4 == NF4Settings()


def test_api_merge_refuses_settings_a_prequantized_base_contradicts(tiny_adapter, prequantized, tmp_path):
    from qmerge import merge_adapter
    from qmerge.errors import QmergeError

    with pytest.raises(QmergeError, match="--double-quant False conflicts with the pre-quantized base's True"):
        merge_adapter(str(prequantized), str(tiny_adapter), tmp_path / "out", double_quant=False, device="cpu")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    out = merge_adapter(str(prequantized), str(tiny_adapter), tmp_path / "out", double_quant=True, device="cpu", verify=False)  # agreeing: fine
    assert (out / "model.safetensors").exists()


def make_lora_adapter(base: Path, directory: Path, seed: int = 2) -> Path:
    """A plain LoRA: PEFT on the 16-bit base (no 4-bit load), random non-zero lora_B."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    peft_model.save_pretrained(directory)
    return directory


def lora_oracle(base: Path, adapter: Path):
    """PEFT on the 16-bit base, unmerged, float32."""
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()


def test_plain_lora_merges_into_original(tiny_base, tmp_path):
    adapter = make_lora_adapter(tiny_base, tmp_path / "lora")
    rep = pipeline.run(RunSettings(base=str(tiny_base), adapter=str(adapter), out=tmp_path / "out", merge_into="original", merged_dtype="float32", **RUN), echo=False)
    tokens = torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        oracle = lora_oracle(tiny_base, adapter)(tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", dtype=torch.float32)(tokens).logits
        qlora = reference_model(tiny_base, adapter)(tokens).logits
    assert mean_kld(oracle, merged) <= 1e-9  # float32 merge into the weights it was trained on: rounding noise only
    assert mean_kld(qlora, merged) > 1e3 * max(mean_kld(oracle, merged), 1e-12)  # the 4-bit base is another model
    assert rep["reference"] == {"name": "reference (LoRA on the 16-bit base)", "kind": "lora"}
    m = rep["evaluations"][0]["metrics"]["merged (original base + adapter)"]
    assert m["kld_mean"] <= 1e-9 and m["top1_agreement"] == 1.0
    assert not {"original", "peft-nf4"} & set(rep["settings"]["candidates"]) and rep["merge"]["nf4_modules"] == 0 and rep["merge"]["verify"]["ok"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "merged into the original 16-bit weights" in md and "Reference: the 16-bit base (a plain LoRA" in md


def test_merge_into_is_a_recipe_key(tiny_base, tiny_adapter, tmp_path):
    from qmerge import recipe

    (tmp_path / "r.yaml").write_text(f"base: {tiny_base}\nadapter: {tiny_adapter}\nout: {tmp_path / 'o'}\nmerge-into: original\n")
    settings = recipe.to_settings(recipe.load(tmp_path / "r.yaml"))
    assert settings.merge_into == "original" and recipe.resolved(settings)["merge-into"] == "original"
    assert settings.nf4_given == ()


@pytest.fixture(scope="module")
def merged(tiny_base, tiny_adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "merged"
    merge(tiny_base, load_adapter(tiny_adapter), out, NF4Settings(), "bfloat16", CPU, show_progress=False)
    return out


def test_verify_passes_a_good_merge(tiny_base, tiny_adapter, merged, cli):
    result = cli("verify", merged, "--base", tiny_base, "--adapter", tiny_adapter, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["exit_status"] == 0 and summary["ok"] and summary["modules"] == 21 and summary["merged_dtype"] == "bfloat16"
    worst = summary["worst"][0]
    assert worst["of_tolerance"] <= 1 and worst["max_rel_err"] <= 2**-8  # bf16 rounding of the exact float32 sum
    assert summary["kld_mean"] <= 1e-4 and summary["kld_limit"] == 1e-3


@pytest.mark.parametrize("tamper", ["flip", "other-settings"])
def test_verify_fails_a_tampered_merge(tiny_base, tiny_adapter, merged, tmp_path, tamper, cli):
    """A flipped tensor, or a merge made with other 4-bit settings (fp4 instead of nf4): exit 4, one line."""
    bad = tmp_path / "merged"
    key = "model.layers.1.mlp.down_proj.weight"
    if tamper == "flip":
        shutil.copytree(merged, bad)
        weights = load_file(bad / "model.safetensors")
        weights[key] = -weights[key]
        save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    else:
        merge(tiny_base, load_adapter(tiny_adapter), bad, NF4Settings(quant_type="fp4"), "bfloat16", CPU, show_progress=False)
    result = cli("verify", bad, "--base", tiny_base, "--adapter", tiny_adapter)
    line = one_line_error(result, 4, "qmerge: verify FAILED: worst ", "max abs err", "max rel err", "mean KLD")
    if tamper == "flip":
        assert key in line
    assert "worst modules" in result.stdout


def test_run_stops_when_the_merge_does_not_verify(tiny_base, tiny_adapter, tmp_path, monkeypatch):
    """A merge bug (simulated: the shard writer flips one tensor) stops `qmerge run` at the merge
    stage with VerifyError (exit 4 in the CLI), and no stage is committed."""
    from qmerge.merge import streaming as merge_module
    from qmerge.errors import VerifyError

    key = "model.layers.0.self_attn.v_proj.weight"
    add = merge_module.ShardWriter.add
    monkeypatch.setattr(merge_module.ShardWriter, "add", lambda self, k, t: add(self, k, -t if k == key else t))
    out = tmp_path / "out"
    with pytest.raises(VerifyError, match=f"verify FAILED: worst {key} max abs err"):
        pipeline.run(RunSettings(base=str(tiny_base), adapter=str(tiny_adapter), out=out, **RUN), echo=False)
    assert not out.exists()
