"""The standard-library docstring corpus's disk cache: what it reads back equals a fresh parse, a
corrupt cache file is rebuilt, and the key follows the library's files."""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from pathlib import Path

import pytest

from qmerge.io import corpus as data


@pytest.fixture
def corpus_cache(tmp_path, monkeypatch):
    """An empty qmerge cache dir, and no in-process memo before or after the test."""
    monkeypatch.setenv("QMERGE_CACHE", str(tmp_path))
    data.stdlib_docstrings.cache_clear()
    yield tmp_path
    data.stdlib_docstrings.cache_clear()


def _load_anew() -> tuple[str, ...]:
    data.stdlib_docstrings.cache_clear()
    return data.stdlib_docstrings()


def test_cached_corpus_equals_a_fresh_parse_and_a_corrupt_file_is_rebuilt(corpus_cache, monkeypatch):
    root = Path(sysconfig.get_paths()["stdlib"])
    fresh = data._parse_docstrings(data._stdlib_files(root))
    assert len(fresh) > 1000 and _load_anew() == fresh  # the first call parses and writes the cache
    (cache_file,) = corpus_cache.glob("stdlib-docstrings-*.json")
    assert json.loads(cache_file.read_text(encoding="utf-8")) == list(fresh)
    assert not list(corpus_cache.glob("*.tmp"))  # written by rename, nothing left behind

    with monkeypatch.context() as m:  # the second process reads the file: parsing would fail the test
        m.setattr(data, "_parse_docstrings", lambda files: pytest.fail("parsed although the cache was valid"))
        assert _load_anew() == fresh

    parses = []
    monkeypatch.setattr(data, "_parse_docstrings", lambda files: parses.append(1) or fresh)  # the real parse was checked above
    for corrupt in (b"\xff\xfe not json", cache_file.read_bytes()[:1000], b'{"not": "a list"}', b"[1, 2]"):
        cache_file.write_bytes(corrupt)
        assert _load_anew() == fresh
        assert json.loads(cache_file.read_text(encoding="utf-8")) == list(fresh)  # and the file is whole again
    assert len(parses) == 4  # each corrupt file was rebuilt by a parse


def test_corpus_key_follows_the_version_path_and_files(tmp_path):
    """Any change to a parsed file's size or mtime, or to the library's path, gives a new key."""
    root = tmp_path / "lib"
    root.mkdir()
    (root / "a.py").write_text('"""doc"""\n')
    (root / "b.py").write_text("x = 1\n")
    files = data._stdlib_files(root)
    key = data._corpus_key(root, files)
    assert key.startswith(f"py{'.'.join(map(str, sys.version_info[:3]))}-") and key == data._corpus_key(root, files)
    (root / "b.py").write_text("x = 12\n")
    assert data._corpus_key(root, files) != key
    resized = data._corpus_key(root, files)
    os.utime(root / "a.py", ns=(0, 0))
    touched = data._corpus_key(root, files)
    assert touched != resized
    moved = root.rename(tmp_path / "lib-moved")
    assert data._corpus_key(moved, data._stdlib_files(moved)) != touched  # the same files elsewhere
