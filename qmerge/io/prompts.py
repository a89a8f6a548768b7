"""Prompts for the side-by-side completions of the report: from a file (`--prompts`), or the first
tokens of the first eval windows, as token ids of the base's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qmerge.errors import QmergeError

PROMPT_TOKENS = 32  # tokens of an eval window taken as a prompt


def from_file(path: str | Path, tokenizer, count: int) -> list[list[int]]:
    """The first `count` prompts of a .txt file (one prompt a line; `\\n` in a line is a newline) or
    a .jsonl file (rows {"prompt": TEXT} or chat {"messages": [...]}, rendered with the tokenizer's
    chat template and the assistant's turn opened, as a chat model is prompted)."""
    path = Path(path).expanduser()
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise QmergeError(f"--prompts {path} holds no prompt; write one prompt a line (.txt) or one JSON object a line (.jsonl)")
    prompts = []
    for n, line in enumerate(lines[:count], 1):
        if path.suffix != ".jsonl":
            prompts.append(tokenizer(line.replace("\\n", "\n"), add_special_tokens=True)["input_ids"])
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise QmergeError(f"{path}:{n} is not valid JSON ({e.msg}); fix the line") from e
        if isinstance(row, dict) and "messages" in row:
            prompts.append(list(tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(tokenizer(row["prompt"], add_special_tokens=True)["input_ids"])
        else:
            raise QmergeError(f"{path}:{n} has neither 'prompt' nor 'messages'; give each line one of them")
    return prompts


def from_windows(windows: torch.Tensor, count: int) -> list[list[int]]:
    """The first PROMPT_TOKENS tokens (at most half a window) of the first `count` eval windows."""
    length = min(PROMPT_TOKENS, windows.shape[1] // 2)
    return [w[:length].tolist() for w in windows[:count]]
