"""The text itself: a handful of prompts completed greedily by the reference (the model as trained)
and by a few candidates (the final checkpoint, and the merge into the original 16-bit weights when
that row exists), side by side in the report with the first token where each departs from the
reference's. Numbers say how much a model drifted; the text shows what that does to an answer.

Completions are made while the drift stage has each model loaded (no extra load), its weights made
once where memory allows (qmerge.models.decoding), by transformers' generate() with argmax at every
step (ties go to the lowest token id) and nothing else, stopping at the end-of-sequence token;
prompts of one length (the default's, cut from eval windows) in one batch. Everything after the
first differing token is conditioned on a different prefix, so only the first divergence is marked.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qmerge.io import prompts as prompt_source
from qmerge.io.manifests import file_sha256
from qmerge.models.decoding import made_once
from qmerge.settings import DataSettings


def shown(kind: str, final_kind: str) -> bool:
    """Beside the reference: the final checkpoint, and the merge into the original 16-bit weights
    (what most tools would have shipped)."""
    return kind in (final_kind, "original")


def key(data: DataSettings) -> list:
    """What the completions depend on besides the models (part of the drift stage's key)."""
    return [file_sha256(Path(data.prompts).expanduser()) if data.prompts else None, data.samples, data.sample_tokens]


class Samples:
    """Completions of the same prompts by several models, and the report's `samples` section."""

    def __init__(self, data: DataSettings, eval_name: str, windows: torch.Tensor, tokenizer, budget: int = 0) -> None:
        """`budget`: bytes a model's float32 weights may take while it decodes (models.decoding)."""
        self.tokenizer, self.tokens, self.eos, self.budget = tokenizer, data.sample_tokens, tokenizer.eos_token_id, budget
        if data.prompts:
            self.prompts, self.source = prompt_source.from_file(data.prompts, tokenizer, data.samples), f"prompts file {data.prompts}"
        else:
            self.prompts = prompt_source.from_windows(windows, data.samples)
            self.source = f"eval set {eval_name}, the first {len(self.prompts[0]) if self.prompts else 0} tokens of windows 1 to {len(self.prompts)}"
        self.completions: dict[str, list[list[int]]] = {}

    def add(self, name: str, model: torch.nn.Module) -> None:
        if self.prompts:
            with made_once(model, self.budget):
                self.completions[name] = complete(model, self.prompts, self.tokens, self.eos)

    def section(self, reference: str) -> dict | None:
        """report.json's `samples`: per prompt its text and token ids, and each model's completion: text, token
        ids, and (not for the reference) the first token that differs from the reference's
        (`diverges_at`, None when none does) with its character span in the text (`marked`)."""
        if not self.prompts or reference not in self.completions:
            return None
        rows = []
        for i, prompt in enumerate(self.prompts):
            ref = self.completions[reference][i]
            done = {name: completion(self.tokenizer, ids[i], ref if name != reference else None) for name, ids in self.completions.items()}
            rows.append({"prompt": self.tokenizer.decode(prompt), "prompt_ids": prompt, "completions": done})
        return {"source": self.source, "tokens": self.tokens, "reference": reference, "prompts": rows}


@torch.inference_mode()
def complete(model: torch.nn.Module, prompts: list[list[int]], tokens: int, eos: int | None = None) -> list[list[int]]:
    """Greedy continuations of `prompts` by `model`: up to `tokens` new token ids each, through
    transformers' generate() with a configuration of its own (the checkpoint's sampling settings,
    repetition penalty and the like are not applied: argmax only). Prompts of one length go through
    together, unpadded: one decoding step costs about what a single prompt's does (on a CPU it is
    bound by reading the weights), and no padding can change a completion."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    config = GenerationConfig(do_sample=False, max_new_tokens=tokens, eos_token_id=eos, pad_token_id=eos)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for length, rows in by_length.items():
        ids = torch.tensor([prompts[i] for i in rows], device=device)
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)[:, length:].tolist()
        for i, row in zip(rows, new):
            out[i] = row[: row.index(eos) + 1] if eos in row else row  # what follows the end of a finished row is padding
    return out


def completion(tokenizer, ids: list[int], reference: list[int] | None) -> dict:
    """One model's completion; against `reference`'s ids, where it first departs from it."""
    text = tokenizer.decode(ids)
    entry = {"text": text, "ids": ids}
    if reference is None:
        return entry
    k = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), None)
    if k is None and len(ids) != len(reference):
        k = min(len(ids), len(reference))  # one stopped (end of sequence) where the other went on
    entry["diverges_at"] = k
    if k is None or k >= len(ids):
        entry["marked"] = None
    else:  # at least one character: a token that is part of a multi-byte character marks that character
        start = _offset(tokenizer, ids, k, text)
        entry["marked"] = [start, min(len(text), max(start + 1, _offset(tokenizer, ids, k + 1, text)))]
    return entry


def _offset(tokenizer, ids: list[int], k: int, text: str) -> int:
    """Where token k starts in `text`: the length of the first k tokens' text (when a token boundary
    splits a multi-byte character, the longest prefix the two decodings share)."""
    head = tokenizer.decode(ids[:k])
    return len(head) if text.startswith(head) else len(os.path.commonprefix([head, text]))
