"""The drift-budget search (`--max-kld X --search`): GPTQModel's `dynamic` written and checked
against the servers' rules, a mixed-precision checkpoint scored as its stored weights, and the
search itself on the tiny model (slow tier)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qmerge.errors import QmergeError
from qmerge.quant import dynamic
from qmerge.quant.dynamic import KEEP, Setting
from qmerge.settings import GPTQSettings

from conftest import SMALL_RUN, one_line_error

LAYER = "model.layers.{}.{}"
SHAPES = {LAYER.format(i, m): shape for i in range(2) for m, shape in {
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64), "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64), "mlp.down_proj": (64, 128)}.items()}
BASE = Setting(4, 32)


def test_dynamic_fields_are_checked_because_gptqmodel_drops_unknown_ones():
    dynamic.validate({"+:^model\\.layers\\.0\\.": {"bits": 8, "group_size": 64, "sym": True, "desc_act": False, "mse": 2.4, "damp_percent": 0.05}, "-:.*o_proj$": {}})
    for bad, words in (({"+:x": {"bitz": 8}}, "'bitz'"), ({"+:x": {"bits": "8"}}, "bits must be int"), ({"+:(": {}}, "not a regular expression"),
                       ({"+:x": {"sym": 1}}, "sym must be bool"), ({"+:x": 8}, "must map to a dict")):
        with pytest.raises(QmergeError, match=words):
            dynamic.validate(bad)


def test_servability_rules_per_target():
    q0 = [LAYER.format(0, f"self_attn.{m}_proj") for m in "qkv"]
    ok = dynamic.write({**{m: Setting(8, 32) for m in q0}, LAYER.format(1, "mlp.down_proj"): KEEP}, BASE)
    assert dynamic.violations(ok, BASE, SHAPES, "vllm") == []
    split = dynamic.write({q0[0]: Setting(8, 32)}, BASE)  # q at 8 bits, k and v at 4: vLLM's fused qkv_proj cannot
    assert any("fuses them" in w for w in dynamic.violations(split, BASE, SHAPES, "sglang"))
    assert dynamic.violations(split, BASE, SHAPES, "transformers") == []
    gate_only = dynamic.write({LAYER.format(1, "mlp.gate_proj"): KEEP}, BASE)
    assert any("gate_proj,up_proj" in w for w in dynamic.violations(gate_only, BASE, SHAPES, "vllm"))
    six = dynamic.write({m: Setting(6, 32) for m in q0}, BASE)  # 5-7 bits: GPTQModel's own packing, not Marlin's
    assert any("6-bit" in w for w in dynamic.violations(six, BASE, SHAPES, "vllm")) and dynamic.violations(six, BASE, SHAPES, "transformers") == []
    assert any("asymmetric" in w for w in dynamic.violations(dynamic.write({m: Setting(4, 32, sym=False) for m in q0}, BASE), BASE, SHAPES, "vllm"))
    assert any("group size 16" in w for w in dynamic.violations(dynamic.write({m: Setting(4, 16) for m in q0}, BASE), BASE, SHAPES, "vllm"))
    assert any("does not divide" in w for w in dynamic.violations(dynamic.write({LAYER.format(0, "mlp.down_proj"): Setting(8, 256)}, BASE), BASE, SHAPES, "any"))
    with pytest.raises(QmergeError, match="--target vllm cannot load"):
        dynamic.check(split, GPTQSettings(group_size=32, target="vllm"), SHAPES)


def test_resolution_agrees_with_gptqmodel():
    """What qmerge says each module gets is what GPTQModel's own dynamic_get decides."""
    from gptqmodel.quantization.config import dynamic_get

    written = dynamic.write({LAYER.format(0, "self_attn.o_proj"): Setting(8, 32), LAYER.format(1, "self_attn.o_proj"): KEEP,
                             LAYER.format(1, "mlp.down_proj"): Setting(8, 64)}, BASE)
    for module in SHAPES:
        ours = dynamic.resolve(written, module, BASE)
        theirs = dynamic_get(written, module)
        if ours is KEEP:
            assert theirs is False, module
        elif ours == BASE:
            assert theirs is None, module
        else:
            assert (theirs["bits"], theirs["group_size"]) == (ours.bits, ours.group_size), module


def _dequantized_by_hand(checkpoint) -> torch.nn.Module:
    """The checkpoint's stored GPTQ v1 tensors unpacked here (codes and zero points, zero + 1 as v1
    stores it, times the float16 scale of each column's group), into a plain float32 model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    stored = {}
    for path in checkpoint.glob("*.safetensors"):
        stored.update(load_file(path))
    config = AutoConfig.from_pretrained(checkpoint)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for key, tensor in stored.items():
        if key.endswith(".qweight"):
            name = key.removesuffix(".qweight")
            g_idx = stored[f"{name}.g_idx"].long()
            bits = 32 * tensor.shape[0] // g_idx.shape[0]
            shifts = torch.arange(32 // bits) * bits
            codes = ((tensor.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)).reshape(-1, tensor.shape[1])  # (in, out)
            qz = stored[f"{name}.qzeros"]
            zeros = ((qz.unsqueeze(2) >> shifts.view(1, 1, -1)) & (2**bits - 1)).reshape(qz.shape[0], -1) + 1
            state[f"{name}.weight"] = ((codes - zeros[g_idx]).float() * stored[f"{name}.scales"].float()[g_idx]).T
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            state[key] = tensor.float()
    assert not model.load_state_dict(state, strict=False).missing_keys
    return model.eval()


def test_mixed_precision_checkpoint_scores_as_its_stored_weights_dequantized_by_hand(tiny_run, tmp_path):
    """8-bit q/k/v in layer 0, a 16-bit o_proj in layer 1, the rest 4-bit: the GPTQ row's loader
    (qmerge.quant.gptq_float, each module at the bits `dynamic` gives it) gives the logits of the
    hand-dequantized weights (float32 summation order: atol 1e-5), and those of GPTQModel's own
    loader, which honours `dynamic` too, within its float16 arithmetic (atol 2e-2 on logits of
    magnitude ~1; a module read at the wrong bits is off by far more)."""
    from gptqmodel import GPTQModel

    from qmerge.eval.candidates import load_checkpoint
    from qmerge.quant.gptq import quantize

    gptq = GPTQSettings(group_size=32)
    q0 = {LAYER.format(0, f"self_attn.{m}_proj"): Setting(8, 32) for m in "qkv"}
    written = dynamic.write({**q0, LAYER.format(1, "self_attn.o_proj"): KEEP}, dynamic.base_setting(gptq))
    calibration = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    quantize(tiny_run.merged, tmp_path / "q", calibration, gptq, torch.device("cpu"), dynamic=written)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["dynamic"] == written
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert stored[LAYER.format(0, "self_attn.q_proj.qweight")].shape[0] == 64 * 8 // 32  # 8-bit codes
    assert stored[LAYER.format(0, "self_attn.o_proj.qweight")].shape[0] == 64 * 4 // 32
    assert LAYER.format(1, "self_attn.o_proj.weight") in stored  # kept 16-bit
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        scored = load_checkpoint(tmp_path / "q", torch.device("cpu"))(input_ids=ids).logits
        by_hand = _dequantized_by_hand(tmp_path / "q")(input_ids=ids).logits
        theirs = GPTQModel.load(str(tmp_path / "q"), device="cpu", dtype=torch.float16, backend="torch").model(input_ids=ids).logits.float()
    assert scored.dtype == torch.float32
    torch.testing.assert_close(scored, by_hand, rtol=0, atol=1e-5)
    torch.testing.assert_close(scored, theirs, rtol=0, atol=2e-2)
    from transformers import AutoModelForCausalLM

    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' GPTQ path ignores `dynamic`: it cannot score this checkpoint
        AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32, device_map={"": "cpu"})


def test_search_needs_a_budget(tiny_base, tiny_adapter, tmp_path, cli):
    one_line_error(cli("run", "--base", tiny_base, "--adapter", tiny_adapter, "--out", tmp_path / "o", "--search"), 2, "--search", "--max-kld")
    assert not (tmp_path / "o").exists()


def _search(tiny_base, tiny_adapter, out, budget: float | None, cli, *extra):
    """`qmerge run --max-kld budget --search` on the tiny model (budget None: the same run, plain)."""
    search = ["--max-kld", budget, "--search"] if budget is not None else []
    args = ["run", "--base", tiny_base, "--adapter", tiny_adapter, "--out", out, *search, "--target", "vllm",
            "--candidates", "merged,gptq", "--samples", "0", "--quiet", *extra]
    for key, value in SMALL_RUN.items():
        args += [f"--{key.replace('_', '-')}", value]
    return cli(*args)


@pytest.mark.slow
def test_search_halves_the_plain_kld_with_a_servable_checkpoint(tiny_run, tiny_base, tiny_adapter, tmp_path, cli):
    """Budget 0.5 × the plain 4-bit g32 row's KLD (the shared run's, same calibration and eval set):
    the search meets it, DIR/gptq is the chosen checkpoint, every row is in the report."""
    plain = tiny_run.report["evaluations"][0]["metrics"]["gptq 4-bit g32"]["kld_mean"]
    result = _search(tiny_base, tiny_adapter, tmp_path / "o", 0.5 * plain, cli)
    assert result.returncode == 0, result.stderr[-2000:]
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    search = rep["search"]
    rows, chosen = search["rows"], search["rows"][search["chosen"]]
    assert rows[0]["kld_mean"] == pytest.approx(plain, rel=1e-3)  # the search's plain row is the shared run's
    assert search["met"] and chosen["kld_mean"] <= 0.5 * plain and len(rows) <= 4
    assert rep["evaluations"][0]["metrics"][rep["final"]]["kld_mean"] == pytest.approx(chosen["kld_mean"], rel=1e-9)  # DIR/gptq is the chosen one
    assert all(r["size_bytes"] >= chosen["size_bytes"] for r in rows if r["ok"])
    written = json.loads((tmp_path / "o" / "gptq" / "config.json").read_text())["quantization_config"]["dynamic"]
    assert written == chosen["dynamic"] and dynamic.violations(written, BASE, SHAPES, "vllm") == []
    assert "Per-module precision" in (tmp_path / "o" / "gptq" / "README.md").read_text()
    assert rep["servers"]["vllm"]["loads"] and not rep["servers"]["transformers"]["loads"]
    html = (tmp_path / "o" / "report.html").read_text()
    assert 'class="chart search"' in html and "(chosen)" in html
    print(f"\nsearch on the tiny model: plain {rows[0]['bits_per_weight']:.3f} bits/weight KLD {plain:.4g} ± {rows[0]['kld_mean_se']:.2g}; chosen {chosen['name']}: "
          f"{chosen['bits_per_weight']:.3f} bits/weight KLD {chosen['kld_mean']:.4g} ± {chosen['kld_mean_se']:.2g}; {len(rows)} GPTQ runs, {search['wall_s']:.1f} s")


@pytest.mark.slow
def test_an_impossible_budget_exits_3_with_the_best_found_and_keeps_the_outputs(tiny_base, tiny_adapter, tmp_path, cli):
    """After a plain run in the same DIR (--resume), the search takes that run's GPTQ stage as its
    plain trial instead of quantizing again: same checkpoint bytes, same KLD."""
    assert _search(tiny_base, tiny_adapter, tmp_path / "o", None, cli).returncode == 0
    plain = json.loads((tmp_path / "o" / "report.json").read_text())
    result = _search(tiny_base, tiny_adapter, tmp_path / "o", 1e-9, cli, "--resume")
    line = one_line_error(result, 3, "max_kld", "search:", "best of", "misses the budget")
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    search = rep["search"]
    assert search["rows"][0]["reused"] and not any(r["reused"] for r in search["rows"][1:])
    assert search["rows"][0]["kld_mean"] == pytest.approx(plain["evaluations"][0]["metrics"][plain["final"]]["kld_mean"], rel=1e-6)
    best = min(r["kld_mean"] for r in search["rows"])
    assert not search["met"] and search["rows"][search["chosen"]]["kld_mean"] == best and search["distance"] == pytest.approx(best - 1e-9)
    assert f"{search['distance']:+.3g}" in line
    for kept in ("merged", "gptq", "report.html", "report.md"):
        assert (tmp_path / "o" / kept).exists()


def _row(name, size, kld, ok, chosen=False):
    return {"name": name, "size_bytes": size, "bits_per_weight": 8 * size / 1e5, "kld_mean": kld, "kld_mean_se": kld / 10, "ok": ok, "wall_s": 1.0,
            "dynamic": {}, **({"chosen": True} if chosen else {})}


def test_choice_and_its_report_on_hand_made_rows():
    """The smallest row within the budget is chosen, else the one of lowest KLD; the report's table,
    chart and verdict say which and how far from the budget (plain data: no run needed)."""
    from qmerge.eval.search import choose
    from qmerge.report import search as report_search

    rows = [_row("plain", 100, 0.09, False), _row("a", 120, 0.04, True), _row("b", 110, 0.045, True), _row("c", 130, 0.03, True)]
    assert choose(rows) == 2
    assert choose([r | {"ok": False} for r in rows]) == 3
    rows[2]["chosen"] = True
    found = {"budget": 0.05, "target": "vllm", "met": True, "chosen": 2, "rows": rows, "ranking": None, "distance": -0.005, "wall_s": 9.0,
             "modules": {"m.q_proj": "8-bit g64", "m.k_proj": "8-bit g64", "m.o_proj": "4-bit g64", "m.down_proj": "4-bit g64", "m.up_proj": "4-bit g64"}}
    line = report_search.verdict(found)
    assert "b (" in line and "meets the budget 0.05 (-0.005, ×0.9)" in line
    md = report_search.markdown({"search": found, "evaluations": [{"eval": "stdlib"}]})
    assert "**→ b**" in md and md.count("\n| ") == 5 and "| 0.500 |" in md  # header + 4 rows; b's KLD is 0.5 × plain's
    svg = report_search.chart(found)
    assert svg.count("<circle") == 4 + 4 and "(chosen)" in svg and "budget: mean KLD 0.05" in svg
    card = report_search.card(found)
    assert "`m.q_proj`: 8-bit g64" in card and "`m.o_proj`" not in card and "3 × 4-bit g64" in card


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2_moe"])
def test_probe_replaying_earlier_layers_gives_the_drops_of_whole_forwards(family):
    """The probe replays the layers before a group's own from the plain forward: every group's KLD
    drop equals the one of a whole forward with that group's modules swapped (tolerance 1e-6 of
    float32 summation order; no layer actually changes, so in practice they are equal)."""
    import transformers as T
    from families import FAMILIES
    from qmerge.eval import sensitivity
    from qmerge.eval.metrics import chunk_stats

    import copy

    config = FAMILIES[family][0]()
    config.initializer_range = 0.2  # logits far from uniform, so the drops are not all ~0
    torch.manual_seed(0)
    floating = T.AutoModelForCausalLM.from_config(config).eval()
    quantized = copy.deepcopy(floating)  # "quantized": every linear layer's weights perturbed
    linears = [n for n, m in quantized.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for n in linears:
            w = quantized.get_submodule(n).weight
            w.add_(0.3 * w.std() * torch.randn_like(w))
    reference = floating
    members = sensitivity.groups(linears)
    windows = torch.randint(0, config.vocab_size, (2, 17))
    calls = []
    hook = sensitivity.decoder_layers(quantized)[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    plain, gains = sensitivity.probe(reference, quantized, floating, windows, members)
    hook.remove()
    assert len(calls) == 1 + sum(".layers.0." in g for g in members)  # layer 0 computed only for the plain forward and its own groups

    inputs, targets = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        ref = reference(input_ids=inputs).logits

        def kld(model):
            return chunk_stats(ref, model(input_ids=inputs).logits, targets).kld.mean().item()

        assert plain == pytest.approx(kld(quantized), abs=1e-6)
        for group, modules in members.items():
            swapped = {m: sensitivity._swap(quantized, m, floating.get_submodule(m)) for m in modules}
            whole = plain - kld(quantized)
            for m, module in swapped.items():
                sensitivity._swap(quantized, m, module)
            assert gains[group] == pytest.approx(whole, abs=1e-6), group
    assert any(abs(g) > 1e-3 for g in gains.values())  # the models differ: the drops are not all zero
    assert all("forward" not in layer.__dict__ for layer in sensitivity.decoder_layers(quantized))  # every layer's own forward put back
