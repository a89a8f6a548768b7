"""The side-by-side completions of a run against an independent recomputation: greedy decoding
written out (no cache, no generate()) on PEFT's QLoRA model and on the GPTQ checkpoint; and the
prompts a file gives."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SMALL_RUN, reference_model
from qmerge.errors import QmergeError
from qmerge.io import prompts, text


def greedy(model, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """Greedy decoding written out: argmax of the last position's logits, appended, `tokens` times
    (the tiny tokenizer's end-of-sequence token never comes first here: checked below), with the
    prompts of the run in one batch as qmerge completes them."""
    ids = torch.tensor(prompts)
    with torch.no_grad():
        for _ in range(tokens):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, len(prompts[0]):].tolist()


def test_completions_match_greedy_decoding_written_out(tiny_run, tiny_base, tiny_adapter):
    s = tiny_run.report["samples"]
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert s["reference"] == "reference (QLoRA as trained)" and s["tokens"] == 32 and len(s["prompts"]) == 4
    shown = set(s["prompts"][0]["completions"])
    assert shown == {s["reference"], "gptq 4-bit g32", "merged into original 16-bit base (PEFT fp16, unsloth, LLaMA-Factory)"}  # final, original
    oracles = {s["reference"]: reference_model(tiny_base, tiny_adapter), "gptq 4-bit g32": AutoModelForCausalLM.from_pretrained(tiny_run.gptq, dtype=torch.float32).eval()}
    windows = text.windows("stdlib", "eval", tok, SMALL_RUN["seq_len"], SMALL_RUN["eval_samples"])
    assert [row["prompt_ids"] for row in s["prompts"]] == windows[:4, :32].tolist()  # the first 32 tokens of the first eval windows
    expected = {name: greedy(model, [row["prompt_ids"] for row in s["prompts"]], 32) for name, model in oracles.items()}
    for i, row in enumerate(s["prompts"]):
        assert row["prompt"] == tok.decode(row["prompt_ids"])
        ref = row["completions"][s["reference"]]
        for name in oracles:
            entry = row["completions"][name]
            assert tok.eos_token_id not in entry["ids"] and entry["ids"] == expected[name][i], name
            assert entry["text"] == tok.decode(entry["ids"])
        for name, entry in row["completions"].items():
            if name == s["reference"]:
                assert "diverges_at" not in entry
                continue
            k = entry["diverges_at"]
            first = next((i for i, (a, b) in enumerate(zip(entry["ids"], ref["ids"])) if a != b), None)
            assert k == first, name
            if k is not None:
                start, end = entry["marked"]
                head, token = tok.decode(entry["ids"][:k]), tok.decode(entry["ids"][k : k + 1])
                assert end > start and (entry["text"][:start] == head or "\ufffd" in head), (name, head)
                assert entry["text"][start:end] == token or "\ufffd" in token + head, (name, token)  # a token inside a multi-byte character marks that character
    md = (tiny_run.out / "report.md").read_text()
    assert md.count("### Prompt ") == 4 and "⟦" in md  # the random tiny model departs somewhere


def test_prompts_from_a_file(tiny_base, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  \nsecond\\nline\nthird\n")
    assert prompts.from_file(txt, tok, 2) == [tok("first prompt")["input_ids"], tok("second\nline")["input_ids"]]
    jsonl = tmp_path / "p.jsonl"
    messages = [{"role": "user", "content": "Say hi."}]
    jsonl.write_text(json.dumps({"prompt": "plain"}) + "\n" + json.dumps({"messages": messages}) + "\n")
    plain, chat = prompts.from_file(jsonl, tok, 8)
    assert plain == tok("plain")["input_ids"]
    assert tok.decode(chat) == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # the assistant's turn opened
    assert prompts.from_windows(torch.arange(40).view(2, 20), 4) == [list(range(10)), list(range(20, 30))]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(QmergeError, match="bad.jsonl:1 has neither 'prompt' nor 'messages'"):
        prompts.from_file(bad, tok, 1)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(QmergeError, match="holds no prompt"):
        prompts.from_file(empty, tok, 1)


def test_weights_made_once_for_decoding_compute_the_same_and_are_put_back(tiny_run, tiny_base, tiny_adapter):
    """models.decoding.made_once on the three kinds of holder (the 4-bit reference, a GPTQ checkpoint's
    levels, a 16-bit checkpoint upcast per use): the same logits, bit for bit, with the weights made
    once; nothing made beyond the budget; every layer's forward as it was afterwards."""
    from qmerge.eval.candidates import load_checkpoint
    from qmerge.merge.adapter import load_mix
    from qmerge.models.decoding import made_once, weight_maker
    from qmerge.models.reference import load_reference
    from qmerge.settings import NF4Settings

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    models = {
        "reference": load_reference(tiny_base, load_mix((str(tiny_adapter),)), NF4Settings(), torch.device("cpu")),
        "gptq": load_checkpoint(tiny_run.gptq, torch.device("cpu")),
        "merged": load_checkpoint(tiny_run.merged, torch.device("cpu")),
    }
    with torch.inference_mode():
        for name, model in models.items():
            layers = [m for m in model.modules() if weight_maker(m) is not None]
            assert layers, name
            forwards = {m: m.__dict__.get("forward") for m in layers}
            before = model(input_ids=ids).logits
            with made_once(model, 0) as made:
                assert not made
            with made_once(model, 1 << 40) as made:
                assert made and all("forward" in m.__dict__ and m.__dict__["forward"] is not forwards[m] for m in layers)
                during = model(input_ids=ids).logits
            assert {m: m.__dict__.get("forward") for m in layers} == forwards, name
            assert torch.equal(before, during), name
