"""The side-by-side completions of a run against an independent recomputation: transformers' own
greedy generate() on PEFT's QLoRA model and on the GPTQ checkpoint; and the prompts a file gives."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SMALL_RUN, reference_model
from qmerge.errors import QmergeError
from qmerge.io import prompts, text


def greedy(model, prompt: list[int], tokens: int, eos: int) -> list[int]:
    """transformers' generate(), greedy, no other logits processing."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=tokens, eos_token_id=eos, pad_token_id=eos)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), generation_config=config)
    return out[0, len(prompt):].tolist()


def test_completions_match_transformers_generate(tiny_run, tiny_base, tiny_adapter):
    s = tiny_run.report["samples"]
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert s["reference"] == "reference (QLoRA as trained)" and s["tokens"] == 32 and len(s["prompts"]) == 4
    shown = set(s["prompts"][0]["completions"])
    assert shown == {s["reference"], "gptq 4-bit g32", "merged into original 16-bit base (PEFT fp16, unsloth, LLaMA-Factory)"}  # final, original
    oracles = {s["reference"]: reference_model(tiny_base, tiny_adapter), "gptq 4-bit g32": AutoModelForCausalLM.from_pretrained(tiny_run.gptq, dtype=torch.float32).eval()}
    windows = text.windows("stdlib", "eval", tok, SMALL_RUN["seq_len"], SMALL_RUN["eval_samples"])
    assert [row["prompt_ids"] for row in s["prompts"]] == windows[:4, :32].tolist()  # the first 32 tokens of the first eval windows
    for row in s["prompts"]:
        prompt = row["prompt_ids"]
        assert row["prompt"] == tok.decode(prompt)
        ref = row["completions"][s["reference"]]
        for name, model in oracles.items():
            entry = row["completions"][name]
            assert entry["ids"] == greedy(model, prompt, 32, tok.eos_token_id), name
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
