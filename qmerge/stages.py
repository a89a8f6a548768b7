"""Finished stages that survive a crash: each stage is built in a hidden sibling directory, fsynced,
renamed into place, and described by a manifest (the key of the inputs and settings that produced it,
and the sha256 of every file). `--resume` reuses a stage whose manifest verifies; anything else is
rebuilt. Disk-full errors become a one-line QmergeError with the partial output removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from qmerge.errors import QmergeError

MANIFESTS = "manifests"


def key_of(**parts) -> str:
    """One digest of everything a stage's output depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


class StageStore:
    """The stage outputs under one run directory."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def manifest_path(self, name: str) -> Path:
        return self.root / MANIFESTS / f"{name}.json"

    def reusable(self, name: str, key: str) -> dict | None:
        """The stage's recorded info when `name` was finished with this key and every file it listed
        is unchanged; None otherwise."""
        path = self.manifest_path(name)
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if manifest.get("key") != key:
            return None
        out = self.root / name
        ok = all((out / rel).is_file() and file_sha256(out / rel) == digest for rel, digest in manifest["files"].items())
        return manifest.get("info", {}) if ok else None

    def clean_partials(self) -> None:
        """Remove what a killed run left half-written (only qmerge's own hidden names)."""
        for p in [*self.root.glob(".*.partial-*"), *self.root.glob(".*.old-*")]:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    @contextlib.contextmanager
    def build(self, name: str, parts: dict, info: dict):
        """Yield a fresh temporary directory; on success it becomes ROOT/name, with a manifest of the
        inputs and settings that produced it (`parts`, and their key) and `info` (filled in by the
        caller meanwhile)."""
        tmp = self.root / f".{name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            self._commit(name, parts, tmp, info)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if disk_full(e):
                raise QmergeError(f"no space left on the device writing {self.root / name}; free space or choose another --out (earlier outputs are intact)") from e
            raise

    def _commit(self, name: str, parts: dict, tmp: Path, info: dict) -> None:
        _fsync_tree(tmp)
        files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = self.manifest_path(name)
        manifest.parent.mkdir(exist_ok=True)
        manifest.unlink(missing_ok=True)  # never a manifest describing files that are not there
        replace_dir(tmp, self.root / name)
        staging = manifest.with_suffix(".json.partial-tmp")
        staging.write_text(json.dumps({"stage": name, "key": key_of(**parts), "produced_by": parts, "files": files, "info": info}, indent=2, default=str))
        with open(staging, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(staging, manifest)
        _fsync_dir(manifest.parent)


def staged(out: Path) -> Path:
    """A hidden sibling of `out` to build a single output in (the API's merge and quantize); see `replace_dir`."""
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    return work


def replace_dir(work: Path, out: Path) -> None:
    """Move a finished directory into place; an existing one (allowed by --overwrite) is removed
    only after the new one is there."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(work, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
