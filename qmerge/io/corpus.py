"""The embedded text every machine has: the docstrings of Python's standard library (about 1 MB of
English prose), split by content hash into disjoint train / calibration / eval parts, and cached on
disk because parsing the library takes seconds."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

PARTS = {"train": range(0, 4), "calibration": range(4, 7), "eval": range(7, 10)}


def cache_dir() -> Path:
    """Where qmerge keeps what it builds once: the demo's base and adapter, the docstring corpus."""
    return Path(os.environ.get("QMERGE_CACHE", Path.home() / ".cache" / "qmerge"))


@lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[str, ...]:
    """Every module, class and function docstring of the standard library, in a fixed order.

    Parsing the whole library takes 5–7 s (75 s under cProfile in a demo run under load), in every
    process that uses the stdlib preset, so the corpus is cached on disk, keyed by the Python version,
    the library's path and the size and mtime of every parsed file: a change to any of them (a Python
    upgrade, a patched module) gives a new key. A cache file that cannot be read is rebuilt."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_files(root)
    path = cache_dir() / f"stdlib-docstrings-{_corpus_key(root, files)}.json"
    try:
        docs = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(docs, list) and all(isinstance(d, str) for d in docs):
            return tuple(docs)
    except (OSError, ValueError):  # missing, unreadable, or not JSON (UnicodeDecodeError is a ValueError)
        pass
    docs = _parse_docstrings(files)
    _write_atomically(path, json.dumps(docs))
    return docs


SKIPPED_TOP = ("site-packages", "test", "tests", "idlelib", "lib2to3")


def _stdlib_files(root: Path) -> list[Path]:
    """The library's own modules, without tests, installed packages and IDLE/2to3. The walk prunes
    those folders rather than filtering afterwards: site-packages can hold far more files than the
    library itself (11,563 against 703 here), and listing them was most of a cache hit's time."""
    files = []
    for folder, dirs, names in os.walk(root):
        top = Path(folder) == root
        dirs[:] = [d for d in dirs if d != "tests" and not (top and d in SKIPPED_TOP)]
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return sorted(files)


def _corpus_key(root: Path, files: list[Path]) -> str:
    listing = [(str(f.relative_to(root)), (st := f.stat()).st_size, st.st_mtime_ns) for f in files]
    digest = hashlib.sha256(json.dumps([str(root), listing]).encode()).hexdigest()[:16]
    return f"py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}-{digest}"


def _parse_docstrings(files: list[Path]) -> tuple[str, ...]:
    docs: list[str] = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    docs.append(doc)
    return tuple(dict.fromkeys(docs))  # drop repeats, keep order


def _write_atomically(path: Path, text: str) -> None:
    """A temporary sibling renamed into place, so a reader never sees half a file. A cache that
    cannot be written (a read-only home) only costs the parse next time."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def stdlib_part(part: str) -> list[str]:
    """The documents of one part; membership is decided by each document's own hash."""
    buckets = PARTS[part]
    return [d for d in stdlib_docstrings() if int(hashlib.sha256(d.encode()).hexdigest(), 16) % 10 in buckets]


