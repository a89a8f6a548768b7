"""Text sources → token windows for calibration and evaluation.

A source is one of:
  a preset                    a file calibration/NAME.toml (stdlib, wikitext2, wikitext2-local, c4):
                              kind "stdlib" = docstrings of Python's standard library (embedded,
                              offline), split by content hash into disjoint train / calibration / eval
                              parts; kind "hub" = a hub dataset with a split per role; kind "file" =
                              local files per role;
  hf:NAME[:CONFIG]:SPLIT[:FIELD]  any hub dataset with a text field (default field "text");
  PATH                        a local .txt, .jsonl ("text" or chat "messages" per line) or a folder of them.
Windows are non-overlapping slices of the documents joined by blank lines, taken in order, each
`seq_len` tokens long; when the tokenizer adds a BOS token (Llama-3, Gemma, Mistral: their attention
sink), each window is BOS + `seq_len` − 1 text tokens, as llama.cpp's perplexity tool starts every
chunk, so eval, verify and calibration see what the model sees in deployment. The same source,
tokenizer and length always give the same windows.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import torch

from qmerge.errors import QmergeError
from qmerge.io.corpus import stdlib_part

PRESETS = Path(__file__).resolve().parents[2] / "calibration"


def preset(name: str) -> dict | None:
    """calibration/NAME.toml, or None; "stdlib" works without the folder (a non-editable install)."""
    path = PRESETS / f"{name}.toml"
    if path.is_file():
        return {**tomllib.loads(path.read_text()), "_dir": path.parent}
    return {"kind": "stdlib"} if name == "stdlib" else None


def load_texts(source: str, role: str, tokenizer=None) -> list[str]:
    """Documents of `source` for `role` ("calibration", "eval" or "train")."""
    p = preset(source) if "/" not in source and not source.startswith("hf:") else None
    if p is not None:
        if p["kind"] == "stdlib":
            return stdlib_part(role)
        if p["kind"] == "hub":
            files = p.get(f"{role}_data_files")
            return _hub_texts(p["dataset"], p.get("config"), p[f"{role}_split"], p.get("text_field", "text"), files)
        path = (p["_dir"] / p[f"{role}_path"]).resolve()
        if not path.exists():
            raise QmergeError(f"preset {source!r} reads {path}, which does not exist here; use another --calibration/--eval source")
        return _file_texts(path, tokenizer)
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        if len(parts) < 2:
            raise QmergeError(f"data source {source!r} needs hf:NAME[:CONFIG]:SPLIT[:FIELD], e.g. hf:wikitext:wikitext-2-raw-v1:test")
        name, rest = parts[0], parts[1:]
        field = rest.pop() if len(rest) == 3 else "text"
        config = rest[0] if len(rest) == 2 else None
        return _hub_texts(name, config, rest[-1], field)
    path = Path(source).expanduser()
    if not path.exists():
        presets = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml"))) or "stdlib"
        raise QmergeError(f"data source {source!r} is neither a preset ({presets}), hf:NAME..., nor an existing file")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise QmergeError(f"{path} holds no .txt or .jsonl files; add some or name a file")
    return [doc for f in files for doc in _file_texts(f, tokenizer)]


def _file_texts(path: Path, tokenizer) -> list[str]:
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8", errors="replace")]
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise QmergeError(f"{path}:{n} is not valid JSON ({e.msg}); fix the line") from e
        if "messages" in row and tokenizer is not None:
            docs.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif "text" in row:
            docs.append(row["text"])
        else:
            raise QmergeError(f"{path}:{n} has neither 'text' nor 'messages'; give each line one of them")
    return docs


def _hub_texts(name: str, config: str | None, split: str, field: str, data_files: str | None = None) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, data_files=data_files)
    except Exception as e:  # datasets raises many types for a missing or unreachable dataset
        raise QmergeError(f"cannot load dataset {name}/{config}:{split} ({type(e).__name__}); check the name and your network") from e
    if field not in ds.column_names:
        raise QmergeError(f"dataset {name} has no field {field!r}; its fields are {', '.join(ds.column_names)}")
    return [t for t in ds[field] if t and t.strip()]


def bos_of(tokenizer) -> int | None:
    """The BOS token id the tokenizer puts before text (add_bos), None when it adds none."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def token_windows(texts: list[str], tokenizer, seq_len: int, count: int, what: str) -> torch.Tensor:
    """`count` non-overlapping windows of `seq_len` tokens, shape (count, seq_len): BOS + seq_len − 1
    text tokens each when the tokenizer adds BOS (bos_of), seq_len text tokens otherwise."""
    if not texts or not any(t.strip() for t in texts):
        raise QmergeError(f"the {what} text is empty; name a source with text in it")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    bos = bos_of(tokenizer)
    step = seq_len - (bos is not None)
    available = ids.numel() // step
    if available < count:
        raise QmergeError(
            f"the {what} text has {ids.numel()} tokens, {available} windows of {seq_len}; "
            f"{count} were asked for: lower the sample count or --seq-len, or add text"
        )
    text = ids[: count * step].view(count, step)
    if bos is None:
        return text.clone()
    return torch.cat([torch.full((count, 1), bos, dtype=text.dtype), text], dim=1)


def windows(source: str, role: str, tokenizer, seq_len: int, count: int) -> torch.Tensor:
    """`count` windows of `seq_len` tokens of `source` for `role` ("calibration" or "eval")."""
    return token_windows(load_texts(source, role, tokenizer), tokenizer, seq_len, count, role)


def scored_bytes(windows: torch.Tensor, tokenizer) -> int:
    """UTF-8 bytes of the scored text (every token after each window's first), for bits per byte."""
    return sum(len(tokenizer.decode(w[1:].tolist()).encode("utf-8")) for w in windows)


def _window_hash(window: torch.Tensor) -> str:
    return hashlib.sha256(window.numpy().tobytes()).hexdigest()


def window_hashes(windows: torch.Tensor) -> set[str]:
    return {_window_hash(w) for w in windows}


def stream_sha256(windows: torch.Tensor) -> str:
    """One digest of the ordered windows: equal digests mean the same token stream (reports comparable)."""
    return hashlib.sha256("".join(_window_hash(w) for w in windows).encode()).hexdigest()


def check_disjoint(calibration: torch.Tensor, evaluation: torch.Tensor, name: str = "eval", allow: bool = False) -> float:
    """The fraction of eval windows that also occur in the calibration set. GPTQ fitted those windows,
    so drift measured on them flatters it: refused unless `allow` (--allow-overlap)."""
    shared = window_hashes(calibration)
    count = sum(_window_hash(w) in shared for w in evaluation)
    if count and not allow:
        raise QmergeError(
            f"{count} of {len(evaluation)} windows of eval set {name!r} also occur in the calibration set; "
            "use a different eval source or split, or pass --allow-overlap to measure anyway"
        )
    return count / len(evaluation)
