"""Hashing that scales: an input file is read once and its digest reused while its size and
modification time hold; a stage file is checked on resume by the size and time recorded with its
hash; --verify-inputs reads everything again."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from qmerge.io.inputs import tree_sha256
from qmerge.io.manifests import StageCommitter, key_of


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QMERGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "file-hashes.json"


def test_input_digest_is_reused_while_size_and_time_hold(tmp_path, cache):
    tree = tmp_path / "model"
    tree.mkdir()
    (tree / "a.bin").write_bytes(b"x" * 1000)
    (tree / "b.json").write_text("{}")
    first = tree_sha256(tree)
    expected = hashlib.sha256(b"a.bin" + hashlib.sha256(b"x" * 1000).hexdigest().encode() + b"b.json" + hashlib.sha256(b"{}").hexdigest().encode()).hexdigest()
    assert first == expected
    entries = json.loads(cache.read_text())
    entries[str((tree / "a.bin").resolve())]["sha256"] = "0" * 64  # a stale digest with the file's own stamp
    cache.write_text(json.dumps(entries))
    assert tree_sha256(tree) != first  # reused: the file was not read again
    assert tree_sha256(tree, verify=True) == first  # read again, and the cache corrected
    assert tree_sha256(tree) == first
    st = (tree / "a.bin").stat()
    (tree / "a.bin").write_bytes(b"y" * 1000)  # same size, new time
    os.utime(tree / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert tree_sha256(tree) != first


def test_resume_catches_a_changed_stage_file(tmp_path):
    committer = StageCommitter(tmp_path)
    with committer.commit("merged", {"a": 1}, {}) as out:
        (out / "model.safetensors").write_bytes(b"weights" * 100)
    key = key_of(a=1)
    assert committer.reusable("merged", key) == {}
    path = tmp_path / "merged" / "model.safetensors"
    st = path.stat()
    path.write_bytes(b"WEIGHTS" * 100)  # same size, rewritten: its time changes
    assert committer.reusable("merged", key) is None
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # a change that hides its time: only hashing finds it
    assert committer.reusable("merged", key) == {}
    assert committer.reusable("merged", key, verify=True) is None
    path.unlink()
    assert committer.reusable("merged", key) is None
