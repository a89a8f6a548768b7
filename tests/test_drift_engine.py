"""The drift engine's memory shape on the tiny model: the reference runs once for all candidates and
its cache (in memory or on disk) gives metrics bit-identical to recomputing it; layer outputs come
from hooks and equal transformers' hidden states; logits exist a chunk of positions at a time."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from qmerge.eval import drift
from qmerge.eval.metrics import POSITIONS
from qmerge.merge.adapter import load_mix
from qmerge.models.checkpoints import load_candidate
from qmerge.models.reference import load_reference
from qmerge.models.taps import Taps
from qmerge.settings import NF4Settings
from test_drift import eval_windows

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def reference(tiny_base, tiny_adapter):
    return load_reference(tiny_base, load_mix((str(tiny_adapter),)), NF4Settings(), CPU)


def test_reference_once_is_bit_identical_to_recomputing_it(reference, tiny_base, tiny_run, tmp_path):
    """Two candidates scored against one reference pass (cache in memory) give exactly the numbers
    of each scored alone against its own fresh reference pass (cache on disk)."""
    windows = eval_windows(tiny_base)[:3]
    builds = {"base": lambda: load_candidate(tiny_base, CPU), "merged": lambda: load_candidate(tiny_run.merged, CPU)}
    together = drift.evaluate(reference, builds, [windows, windows[1:]], "bfloat16", batch_size=2, show_progress=False)
    for name, build in builds.items():
        alone = drift.evaluate(reference, {name: build}, [windows, windows[1:]], "float32", batch_size=2, show_progress=False, cache_budget=0, cache_dir=tmp_path)
        for t, a in zip(together, alone, strict=True):
            assert t["metrics"][name] == a["metrics"][name] and t["layers"][name] == a["layers"][name], name
    assert list(tmp_path.iterdir()) == []  # the disk cache is gone afterwards



def test_one_scoring_shared_by_trials_gives_each_its_fresh_evaluation(reference, tiny_base, tiny_run):
    """The search's pattern: one Scoring (the reference run once), a candidate scored and its result
    read before the next is built; each result is exactly a fresh `evaluate` of that candidate."""
    windows = eval_windows(tiny_base)[:3]
    builds = {"base": lambda: load_candidate(tiny_base, CPU), "merged": lambda: load_candidate(tiny_run.merged, CPU)}
    with drift.Scoring(reference, [windows]) as scoring:
        scoring.run_reference()
        for name, build in builds.items():
            scoring.score(name, build())
            shared = scoring.results([name])[0]
            fresh = drift.evaluate(reference, {name: build}, [windows], "float32", show_progress=False)[0]
            assert shared["metrics"][name] == fresh["metrics"][name] and shared["layers"][name] == fresh["layers"][name], name


def test_a_candidate_with_the_bases_head_is_projected_with_the_references(reference, tiny_run):
    """The merged candidate holds the base's head in 16 bits and upcasts it per use; the reference
    holds it in float32. drift.Scoring projects the candidate's final hidden states with the
    reference's head (keeping nothing of the candidate): the same logits bit for bit. A head with
    one value changed is not taken for it."""
    from qmerge.models.taps import same_head

    ref, merged = Taps(reference), Taps(load_candidate(tiny_run.merged, CPU))
    assert merged.head.weight.dtype != torch.float32 and merged.head is not ref.head
    assert same_head(ref.projection(), merged.projection())
    hidden = torch.randn(2, 9, ref.config.hidden_size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ref.logits(hidden), merged.logits(hidden))
    with torch.no_grad():
        merged.head.weight[3, 1] += 1
    assert not same_head(ref.projection(), merged.projection())


def test_cache_bytes_and_where(reference, tiny_base, tmp_path):
    windows = eval_windows(tiny_base)
    config = reference.get_base_model().config
    assert drift.cache_bytes(reference, [windows]) == len(windows) * (windows.shape[1] - 1) * config.num_hidden_layers * config.hidden_size * 4
    with drift.ReferenceCache(100, 99, tmp_path) as on_disk, drift.ReferenceCache(100, 100) as in_memory:
        assert on_disk.on_disk and not in_memory.on_disk
        for cache in (on_disk, in_memory):
            a, b = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
            cache.put((0, 0), 0, a)
            cache.put((0, 0), 1, b)
            assert torch.equal(cache.get((0, 0), 1), b) and torch.equal(cache.get((0, 0), 0), a)


def test_taps_give_transformers_hidden_states_and_chunked_logits(tiny_base):
    """Hooked layer outputs equal output_hidden_states' rows bit for bit (the last row: the normed
    final state); logits projected from it on a span equal the model's own; the head itself runs on
    no position (no full-batch logits)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    taps = Taps(model)
    seen: dict[int, torch.Tensor] = {}
    head_positions = []
    handle = taps.head.register_forward_hook(lambda _m, _a, out: head_positions.append(out.shape[-2]))
    with torch.inference_mode():
        final = taps.run(ids, lambda i, h: seen.setdefault(i, h.clone()))
        handle.remove()
        own = model(input_ids=ids, output_hidden_states=True)
        chunk = taps.logits(final[:, 8:8 + POSITIONS])
    assert head_positions == [0]
    assert sorted(seen) == list(range(model.config.num_hidden_layers))
    assert all(torch.equal(seen[i], own.hidden_states[i + 1]) for i in seen)
    assert torch.allclose(chunk, own.logits[:, 8:8 + POSITIONS], rtol=1e-5, atol=1e-5)


def test_candidates_built_in_memory_stay_in_storage_precision(reference, tiny_base, tiny_adapter, tiny_run):
    """"original" is the streamed merge into the original weights (DIR/merged-original) exactly, held
    in bf16; "base" in bf16; "rtn" as int8 levels with the products of its float32 rounding;
    "peft-nf4" in 4-bit bitsandbytes layers."""
    import bitsandbytes as bnb

    from qmerge.eval import candidates
    from qmerge.quant import rtn
    from qmerge.settings import GPTQSettings
    from test_drift import linear_shapes

    gptq = GPTQSettings(group_size=32)
    src = candidates.Sources(tiny_run.out, tiny_base, load_mix((str(tiny_adapter),)), NF4Settings(), gptq, "bfloat16", linear_shapes(tiny_run.merged), CPU)
    ids = eval_windows(tiny_base)[:2, :-1]
    built = {kind: candidates.build(kind, src, reference)[0] for kind in ("original", "base", "rtn", "peft-nf4")}
    stream_merged = load_candidate(tiny_run.out / "merged-original", CPU)
    rounded = AutoModelForCausalLM.from_pretrained(tiny_run.merged, dtype=torch.float32).eval()
    with torch.inference_mode():
        for name in linear_shapes(tiny_run.merged):
            lin = rounded.get_submodule(name)
            lin.weight.copy_(rtn.fake_quantize(lin.weight, gptq))
        assert torch.equal(built["original"](input_ids=ids).logits, stream_merged(input_ids=ids).logits)
        assert torch.equal(built["rtn"](input_ids=ids).logits, rounded(input_ids=ids).logits)
    q = "model.layers.0.self_attn.q_proj"
    assert built["original"].get_submodule(q).weight.dtype == built["base"].get_submodule(q).weight.dtype == torch.bfloat16
    assert built["rtn"].get_submodule(q).levels.dtype == torch.int8
    assert isinstance(built["peft-nf4"].get_submodule(q), bnb.nn.Linear4bit)


def test_streamed_candidates_give_the_numbers_of_resident_ones(reference, tiny_base, tiny_adapter, tiny_run, tmp_path):
    """Candidates whose decoder layers are read from their checkpoint as each runs (accelerate's disk
    offload; "original" with the adapter's edits applied on the way, "rtn" rounded from the stored
    weights) score exactly as resident ones, and hold no decoder-layer weight in memory."""
    from qmerge.eval import candidates
    from qmerge.models.placement import Placement
    from qmerge.settings import GPTQSettings
    from test_drift import linear_shapes

    windows = eval_windows(tiny_base)[:2]
    results, held = {}, {}
    for mode, where in (("resident", CPU), ("streamed", Placement(CPU, stream="disk", offload_dir=tmp_path))):
        src = candidates.Sources(tiny_run.out, tiny_base, load_mix((str(tiny_adapter),)), NF4Settings(), GPTQSettings(group_size=32), "bfloat16", linear_shapes(tiny_run.merged), where)

        def build(kind, src=src, mode=mode):
            model = candidates.build(kind, src, reference)[0]
            held[mode, kind] = model.get_submodule("model.layers.1.mlp.up_proj").weight.device.type if kind != "rtn" else "cpu"
            return model

        builds = {kind: (lambda kind=kind: build(kind)) for kind in ("merged", "original", "base", "rtn")}
        results[mode] = drift.evaluate(reference, builds, [windows], "float32", show_progress=False)[0]
    assert results["streamed"] == results["resident"]
    assert {k: v for k, v in held.items() if k[0] == "streamed" and k[1] != "rtn"} == {("streamed", k): "meta" for k in ("merged", "original", "base")}


def test_peft_nf4_is_peft_merge_and_unload_and_shares_what_it_does_not_touch(reference, tiny_base, tiny_adapter):
    """The "peft-nf4" row holds exactly what the oracle holds, PEFT's own merge_and_unload on a fresh
    bitsandbytes 4-bit load of the base: the same re-rounded codes and statistics, the same other
    tensors (compared stored, before any forward: bitsandbytes repacks a CPU layer at its first; the
    row computes in float32 on them, as the reference does, where bitsandbytes' CPU forward rounds to
    bf16). Building it leaves the reference as it was; embeddings, head and norms are the
    reference's own tensors, not a copy."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft import PeftModel

    from qmerge.merge.nf4 import bnb_config
    from qmerge.models.reference import peft_nf4

    ids = eval_windows(tiny_base)[:2, :-1]
    with torch.inference_mode():
        before = reference(input_ids=ids).logits
        model = peft_nf4(reference)
        fresh = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, quantization_config=bnb_config(NF4Settings(), "float32"))
        oracle = PeftModel.from_pretrained(fresh, str(tiny_adapter)).merge_and_unload()
        ours, theirs = dict(model.named_modules()), dict(oracle.named_modules())
        assert ours.keys() == theirs.keys()
        four_bit = [name for name, m in theirs.items() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(four_bit) == 14 and all(isinstance(ours[name], bnb.nn.Linear4bit) for name in four_bit)
        for name in four_bit:
            a, b = ours[name].weight, theirs[name].weight
            assert torch.equal(dequantize_4bit(a.data, a.quant_state), dequantize_4bit(b.data, b.quant_state)), name
        stored = dict(oracle.named_parameters())
        for name, p in model.named_parameters():
            if p.dtype != torch.uint8:
                assert torch.equal(p, stored[name]), name
        model(input_ids=ids)
        assert torch.equal(reference(input_ids=ids).logits, before)
    own = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        if "lora_" not in name and ".base_layer." not in name:
            assert own[name.replace("base_model.model.", "", 1)] is p, name
