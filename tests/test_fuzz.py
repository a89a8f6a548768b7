"""hypothesis fuzz of adapter_config.json fields and of corrupted adapter files: qmerge either merges
correctly (checked against PEFT's own delta for the same files) or refuses with a QmergeError,
never another exception and never a wrong file."""

from __future__ import annotations

import json
import math
import shutil
import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qmerge
from conftest import FUZZ_CASES, examples
from qmerge.io.checkpoint import LazyCheckpoint
from qmerge.errors import QmergeError
from qmerge.merge.nf4 import round_trip
from qmerge.settings import NF4Settings

COUNTS = examples(quick=6, full=30)


def fuzz(count: int):
    return settings(max_examples=count, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
junk = st.one_of(st.none(), st.booleans(), st.integers(-4, 32), st.floats(allow_nan=True, allow_infinity=True), st.text(string.printable, max_size=5), st.lists(st.integers(), max_size=2))
patterns = st.dictionaries(st.sampled_from(["q_proj", "layers.0.mlp.up_proj", "v_proj", "(", "o_proj$"]), st.one_of(st.integers(-2, 16), st.floats(-1, 64), st.text(max_size=2)), max_size=3)
fields = st.fixed_dictionaries(
    {},
    optional={
        "r": st.one_of(st.just(8), junk),
        "lora_alpha": st.one_of(st.floats(0.5, 64), junk),
        "use_rslora": st.one_of(st.booleans(), junk),
        "rank_pattern": st.one_of(patterns, junk),
        "alpha_pattern": st.one_of(patterns, junk),
        "fan_in_fan_out": st.one_of(st.booleans(), junk),
        "use_dora": st.one_of(st.booleans(), junk),  # true without saved magnitudes: refused as inconsistent
        "lora_bias": st.one_of(st.booleans(), junk),
        "trainable_token_indices": st.one_of(st.lists(st.integers(-2, 600), max_size=3), st.dictionaries(st.sampled_from(["embed_tokens", "lm_head"]), st.lists(st.integers(0, 9), max_size=2), max_size=2), junk),
        "modules_to_save": st.one_of(st.lists(st.sampled_from(["lm_head", "embed_tokens", "norm"]), max_size=2), junk),
        "layer_replication": st.one_of(st.just([[0, 2]]), junk),
        "init_lora_weights": st.one_of(st.sampled_from([True, False, "gaussian", "pissa", "olora", "loftq"]), junk),
        "peft_type": st.one_of(st.just("LORA"), junk),
    },
)


def peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor] | None:
    """PEFT's own scale·B·A per module for these files, or None where PEFT cannot load them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    except Exception:  # PEFT refuses the config: then qmerge's answer is judged on its own
        return None
    return {f"{name.removeprefix('base_model.model.')}.weight": m.get_delta_weight("default") for name, m in model.named_modules() if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})}


def count(what: str) -> None:
    FUZZ_CASES[what] = FUZZ_CASES.get(what, 0) + 1


def check(base: Path, adapter: Path, out: Path, what: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    try:
        qmerge.merge_adapter(str(base), str(adapter), out, merged_dtype="float32", device="cpu", verify=False)
    except QmergeError as e:
        assert str(e) and "\n" not in str(e)
        assert not out.exists()
        count(f"{what}: refused with a message")
        return
    oracle = peft_deltas(base, adapter)
    count(f"{what}: merged, {'checked against PEFT' if oracle is not None else 'PEFT cannot load it'}")
    merged, original = LazyCheckpoint.open(out), LazyCheckpoint.open(base)
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        delta = merged.get(key) - round_trip(original.get(key), NF4Settings(), torch.device("cpu"))
        assert torch.isfinite(delta).all()
        if oracle is not None:
            assert torch.allclose(delta, oracle[key], atol=1e-5, rtol=1e-4), key


@pytest.mark.parametrize("count", COUNTS)
def test_fuzz_adapter_config(tiny_base, tiny_adapter, tmp_path_factory, count):
    @fuzz(count)
    @given(changes=fields)
    def case(changes):
        adapter = tmp_path_factory.mktemp("fuzz") / "adapter"
        shutil.copytree(tiny_adapter, adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config.update({k: v for k, v in changes.items() if not (isinstance(v, float) and math.isnan(v))})
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        check(tiny_base, adapter, adapter.parent / "out", "adapter_config.json")

    case()


@pytest.mark.parametrize("count", COUNTS)
def test_fuzz_corrupted_adapter_file(tiny_base, tiny_adapter, tmp_path_factory, count):
    fuzz(count)(given(data=st.data())(lambda data: corrupt_and_check(tiny_base, tiny_adapter, tmp_path_factory, data)))()


def corrupt_and_check(tiny_base: Path, tiny_adapter: Path, tmp_path_factory, data) -> None:
    adapter = tmp_path_factory.mktemp("fuzz") / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    path = adapter / "adapter_model.safetensors"
    raw = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "header"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        header_len = int.from_bytes(raw[:8], "little")
        lo, hi = (0, 8 + header_len) if how == "header" else (8 + header_len, len(raw))
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(lo, hi - 1))
            raw[i] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    check(tiny_base, adapter, adapter.parent / "out", "corrupted adapter file")
