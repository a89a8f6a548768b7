"""Every adapter feature PEFT's LoRA writes, merged by qmerge and checked against the oracle: PEFT's
own QLoRA model (NF4 base + adapter, unmerged, computing in float32).

Tolerances: mean KLD ≤ 1e-6 (the merge is float32 on the exact NF4 values, so only rounding noise is
left; the issue's bound is 1e-3). Tensors bitsandbytes never quantizes (embeddings, lm_head,
modules_to_save) are also compared with PEFT's effective weight in a bfloat16 merge: equal within one
bf16 rounding, |merged − expected| ≤ 2⁻⁸·|expected|.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import qmerge
from conftest import make_base, make_qlora_adapter, mean_kld, reference_model
from qmerge.merge.adapter import load_adapter, load_mix, parse_spec
from qmerge.io.checkpoint import LazyCheckpoint
from qmerge.errors import QmergeError
from qmerge.merge.lora import LoraDelta
from qmerge.merge.streaming import merge
from qmerge.merge.nf4 import round_trip
from qmerge.settings import NF4Settings

CPU = torch.device("cpu")
KLD_TOL = 1e-6
BF16_RTOL = 2.0**-8


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(7)
    return torch.randint(3, 512, (4, 48))


@pytest.fixture(scope="module")
def biased_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("biased") / "base", attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("tied") / "base", tie_word_embeddings=True)


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def merged_model(base: Path, adapter, out: Path, dtype: str = "float32"):
    result = merge(base, adapter, out, NF4Settings(), dtype, CPU, show_progress=False)
    return result, AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def check_against_oracle(base: Path, adapter: Path, out: Path, tokens) -> tuple[float, object]:
    """(mean KLD of the merged model from PEFT's QLoRA model, MergeResult)."""
    result, model = merged_model(base, load_adapter(adapter), out)
    return mean_kld(logits(reference_model(base, adapter), tokens), logits(model, tokens)), result


VARIANTS = {
    "alpha_over_r": dict(r=4, lora_alpha=32),
    "rslora": dict(use_rslora=True, lora_alpha=6),
    "rank_and_alpha_pattern": dict(rank_pattern={"q_proj": 4, "layers.1.mlp.up_proj": 2}, alpha_pattern={"v_proj": 3}),
    "target_modules_list": dict(target_modules=["q_proj", "v_proj"]),
    "target_modules_regex": dict(target_modules=r".*\.layers\.1\..*(k_proj|down_proj)"),
    "target_modules_all_linear": dict(target_modules="all-linear"),
    "layers_to_transform": dict(target_modules=["q_proj", "o_proj", "gate_proj"], layers_to_transform=[1], layers_pattern="layers"),
    "dora": dict(use_dora=True),
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]),
    "trainable_token_indices": dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 17]),
    "trainable_tokens_on_lm_head": dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [7, 9]}),
    "lora_on_embeddings_and_lm_head": dict(target_modules=["q_proj", "embed_tokens", "lm_head"]),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_matches_peft_qlora_model(variant, tiny_base, tmp_path, tokens):
    adapter = make_qlora_adapter(tiny_base, tmp_path / "adapter", **VARIANTS[variant])
    kld, result = check_against_oracle(tiny_base, adapter, tmp_path / "merged", tokens)
    assert kld <= KLD_TOL, kld
    assert not result.untied_embeddings


def test_dora_norm_matters(tiny_base, tmp_path, tokens):
    """The DoRA rescaling is real: the same adapter merged as plain LoRA is far from the oracle."""
    adapter_dir = make_qlora_adapter(tiny_base, tmp_path / "adapter", use_dora=True)
    adapter = load_adapter(adapter_dir)
    plain = dataclasses.replace(adapter, edits={k: tuple(dataclasses.replace(e, magnitude=None) if isinstance(e, LoraDelta) else e for e in es) for k, es in adapter.edits.items()})
    ref = logits(reference_model(tiny_base, adapter_dir), tokens)
    dora = mean_kld(ref, logits(merged_model(tiny_base, adapter, tmp_path / "dora")[1], tokens))
    lora = mean_kld(ref, logits(merged_model(tiny_base, plain, tmp_path / "plain")[1], tokens))
    assert dora <= KLD_TOL and lora > 1e-4 and lora > 1000 * dora, (dora, lora)


def test_biased_layers_with_lora_bias_and_trained_biases(biased_base, tmp_path, tokens):
    """attention_bias/mlp_bias: lora_bias scaled as PEFT's forward scales it (not PEFT's unscaled bnb
    merge), and biases trained with bias="all" replacing the base's."""
    adapter = make_qlora_adapter(biased_base, tmp_path / "adapter", lora_bias=True)
    kld, _ = check_against_oracle(biased_base, adapter, tmp_path / "merged", tokens)
    assert kld <= KLD_TOL, kld
    key = "model.layers.0.self_attn.q_proj.bias"
    saved = LazyCheckpoint.file(adapter / "adapter_model.safetensors").get(f"base_model.model.{key.removesuffix('.bias')}.lora_B.bias")
    merged, base = LazyCheckpoint.open(tmp_path / "merged").get(key), LazyCheckpoint.open(biased_base).get(key).float()
    assert torch.allclose(merged, base + 2.0 * saved, atol=1e-6)  # scale = 16/8
    assert not torch.allclose(merged, base + saved, atol=1e-3)
    trained = make_qlora_adapter(biased_base, tmp_path / "bias-all", bias="all")
    kld, _ = check_against_oracle(biased_base, trained, tmp_path / "merged-bias-all", tokens)
    assert kld <= KLD_TOL, kld


def effective_weights(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What PEFT's QLoRA model computes with for the layers bitsandbytes leaves in float."""
    model = reference_model(base, adapter).base_model.model
    out = {}
    for name in ("model.embed_tokens", "lm_head"):
        module = model.get_submodule(name)
        if hasattr(module, "modules_to_save"):
            out[name] = module.modules_to_save["default"].weight
        elif hasattr(module, "token_adapter"):
            out[name] = module.token_adapter.get_merged_weights(["default"])
        elif hasattr(module, "get_delta_weight"):
            out[name] = module.base_layer.weight + module.get_delta_weight("default")
        else:
            out[name] = module.weight
    return {f"{k}.weight": v.detach().float() for k, v in out.items()}


@pytest.mark.parametrize("variant", ["modules_to_save", "trainable_tokens_on_lm_head", "lora_on_embeddings_and_lm_head"])
def test_float_layers_equal_peft_within_bf16_rounding(variant, tiny_base, tmp_path):
    """Embeddings, lm_head and modules_to_save are merged in float and rounded once to the output dtype,
    never NF4-rounded."""
    adapter = make_qlora_adapter(tiny_base, tmp_path / "adapter", **VARIANTS[variant])
    merge(tiny_base, load_adapter(adapter), tmp_path / "merged", NF4Settings(), "bfloat16", CPU, show_progress=False)
    merged, base = LazyCheckpoint.open(tmp_path / "merged"), LazyCheckpoint.open(tiny_base)
    for key, expected in effective_weights(tiny_base, adapter).items():
        got = merged.get(key).float()
        assert (got - expected).abs().le(BF16_RTOL * expected.abs() + 1e-7).all(), key
        assert not torch.equal(got, base.get(key).float()), key  # the adapter did change it
        assert not torch.allclose(got, round_trip(expected, NF4Settings(), CPU).float(), atol=1e-3), key


TIED = {  # variant -> tie kept?
    "trainable_token_indices": True,  # PEFT ties lm_head's token adapter to the embedding's
    "lora_on_embeddings_and_lm_head": False,
    "modules_to_save": False,
}


@pytest.mark.parametrize("variant", TIED)
def test_tied_embeddings(variant, tied_base, tmp_path, tokens):
    lora = {**VARIANTS[variant], "modules_to_save": ["embed_tokens"]} if variant == "modules_to_save" else VARIANTS[variant]
    adapter = make_qlora_adapter(tied_base, tmp_path / "adapter", **lora)
    kld, result = check_against_oracle(tied_base, adapter, tmp_path / "merged", tokens)
    assert kld <= KLD_TOL, kld
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    keys = set(LazyCheckpoint.open(tmp_path / "merged").keys())
    assert result.untied_embeddings is (not TIED[variant])
    assert config["tie_word_embeddings"] is TIED[variant]
    assert ("lm_head.weight" in keys) is (not TIED[variant])
    original = AutoModelForCausalLM.from_pretrained(tied_base, dtype=torch.float32)
    from qmerge.models.checkpoints import load_baseline  # "merged into original" runs the same edits and tie rule in memory
    baseline = load_baseline("original", tied_base, load_mix((str(adapter),)), CPU)
    merge(tied_base, load_adapter(adapter), tmp_path / "into-original", NF4Settings(), "float32", CPU, into="original", show_progress=False)
    on_disk = AutoModelForCausalLM.from_pretrained(tmp_path / "into-original", dtype=torch.float32).eval()
    assert mean_kld(logits(on_disk, tokens), logits(baseline, tokens)) <= 1e-10
    assert mean_kld(logits(original, tokens), logits(baseline, tokens)) > 1e-6


def test_weighted_mix_matches_peft_weighted_adapter(tiny_base, tmp_path, tokens):
    """--adapter A:0.7 --adapter B:0.3 is 0.7·ΔA + 0.3·ΔB: checked against PEFT's add_weighted_adapter
    (combination_type="cat", exact for a linear combination), and qmerge's drift reference (both
    adapters active, scalings weighted) against the same oracle. B has LoRA on the embeddings and
    lm_head, whose unchanged copies PEFT saves with it."""
    from qmerge.models.reference import load_reference

    a = make_qlora_adapter(tiny_base, tmp_path / "a", target_modules=["q_proj", "v_proj"], seed=1)
    b = make_qlora_adapter(tiny_base, tmp_path / "b", target_modules=["q_proj", "k_proj", "embed_tokens", "lm_head"], use_rslora=True, r=4, seed=2)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in LazyCheckpoint.file(b / "adapter_model.safetensors").keys()
    oracle = reference_model(tiny_base, a)
    oracle.load_adapter(b, adapter_name="b")
    oracle.add_weighted_adapter(["default", "b"], [0.7, 0.3], "mix", combination_type="cat")
    oracle.set_adapter("mix")
    expected = logits(oracle, tokens)
    mix = load_mix((f"{a}:0.7", f"{b}:0.3"))
    _, model = merged_model(tiny_base, mix, tmp_path / "merged")
    merged = mean_kld(expected, logits(model, tokens))
    reference = mean_kld(expected, logits(load_reference(tiny_base, mix, NF4Settings(), CPU), tokens))
    only_a = mean_kld(expected, logits(reference_model(tiny_base, a), tokens))
    assert merged <= KLD_TOL and reference <= KLD_TOL and only_a > 1e-4, (merged, reference, only_a)


def test_adapter_specs(tmp_path):
    assert parse_spec("org/adapter") == ("org/adapter", 1.0)
    assert parse_spec("dir/a:0.25") == ("dir/a", 0.25)
    assert parse_spec("c:/dir/a") == ("c:/dir/a", 1.0)
    with pytest.raises(QmergeError, match="finite non-zero"):
        parse_spec("dir/a:0")


REFUSED = {  # LoraConfig change -> words of the one-line refusal
    "layer_replication": (dict(layer_replication=[[0, 2]]), "layer replication"),
    "target_parameters": (dict(target_parameters=["mlp.up_proj.weight"]), "target_parameters"),
    "alora": (dict(alora_invocation_tokens=[5]), "activated LoRA"),
    "pissa": (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
}


@pytest.mark.parametrize("field", REFUSED)
def test_unsupported_fields_are_refused_by_name(field, tiny_base, tiny_adapter, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes((tiny_adapter / "adapter_model.safetensors").read_bytes())
    changes, words = REFUSED[field]
    (adapter / "adapter_config.json").write_text(json.dumps({**json.loads((tiny_adapter / "adapter_config.json").read_text()), **changes}))
    with pytest.raises(QmergeError, match=words.replace("(", r"\(")) as e:
        qmerge.merge_adapter(str(tiny_base), str(adapter), tmp_path / "out", device="cpu")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_refused_combinations(tiny_base, biased_base, tiny_adapter, tmp_path):
    dora = make_qlora_adapter(tiny_base, tmp_path / "dora", use_dora=True, target_modules=["q_proj"])
    with pytest.raises(QmergeError, match="not a linear combination"):
        qmerge.merge_adapter(str(tiny_base), [f"{dora}:0.5", str(tiny_adapter)], tmp_path / "out", device="cpu")
    bias = make_qlora_adapter(biased_base, tmp_path / "bias", lora_bias=True, target_modules=["q_proj"])
    with pytest.raises(QmergeError, match="no bias"):
        qmerge.merge_adapter(str(tiny_base), str(bias), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_cli_weighted_adapters_end_to_end(tiny_base, tmp_path, cli):
    """`qmerge run --adapter A:0.7 --adapter B:0.3`: merged, measured against the same mix run by PEFT
    (the drift reference), recorded in the report and in a resolved recipe that repeats the run."""
    a = make_qlora_adapter(tiny_base, tmp_path / "a", target_modules=["q_proj", "v_proj"], seed=1)
    b = make_qlora_adapter(tiny_base, tmp_path / "b", seed=2)
    out = tmp_path / "out"
    args = ["--base", str(tiny_base), "--skip-gptq", "--seq-len", "64", "--eval-samples", "4", "--candidates", "merged,original"]
    result = cli("run", *args, "--adapter", f"{a}:0.7", "--adapter", f"{b}:0.3", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    metrics = rep["evaluations"][0]["metrics"]
    merged = metrics["merged (NF4 base + adapter)"]["kld_mean"]
    original = metrics["merged into original 16-bit base (PEFT fp16, unsloth, LLaMA-Factory)"]["kld_mean"]
    assert merged <= KLD_TOL and original > 100 * merged, (merged, original)
    parts = rep["inputs"]["adapter"]["parts"]
    assert [p["weight"] for p in parts] == [0.7, 0.3] and rep["settings"]["adapter"] == [f"{a}:0.7", f"{b}:0.3"]
    again = cli("run", "--recipe", out / "recipe.resolved.yaml", "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "again" / "merged" / "model.safetensors").read_bytes() == (out / "merged" / "model.safetensors").read_bytes()
