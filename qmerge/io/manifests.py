"""The stage committer: each finished stage of a run is an atomic directory (qmerge.io.atomic) plus a
manifest, DIR/manifests/STAGE.json, holding the key of the inputs and settings that produced it, the
sha256 of every file, and what the stage reported. `--resume` reuses a stage whose manifest verifies;
anything else is rebuilt."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from qmerge.io.atomic import building, clean_partials, write_file

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


def files_record(root: Path) -> dict[str, dict]:
    """Every file under `root`: its sha256, and the size and modification time it had when hashed."""
    return {str(p.relative_to(root)): {"sha256": file_sha256(p), **stamp(p)} for p in sorted(root.rglob("*")) if p.is_file()}


def stamp(path: Path) -> dict:
    """What changes whenever a file is written: its size and modification time (ns)."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def unchanged(path: Path, record: dict | str, verify: bool) -> bool:
    """A stage file still holds what its manifest recorded: the same size and modification time (a
    write, a truncation, a copy over it changes them), or with `verify` (and for a manifest without
    stamps) the same sha256, read again."""
    if not path.is_file():
        return False
    if isinstance(record, str):
        return file_sha256(path) == record
    if verify:
        return file_sha256(path) == record["sha256"]
    return stamp(path) == {"size": record["size"], "mtime_ns": record["mtime_ns"]}


class StageCommitter:
    """The stage outputs under one run directory, each with its manifest."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def clean_partials(self) -> None:
        """Remove what a killed run left half-written: stage directories and manifests."""
        clean_partials(self.root)
        clean_partials(self.root / MANIFESTS)

    def manifest_path(self, name: str) -> Path:
        return self.root / MANIFESTS / f"{name}.json"

    def key(self, name: str) -> str | None:
        """The key `name` was last committed with (None: never, or its manifest is unreadable)."""
        return self._manifest(name).get("key")

    def listed(self, name: str) -> list[str]:
        """The files the stage `name` made, relative to its directory (files written into it later,
        such as the GPTQ model card, are not among them)."""
        return list(self._manifest(name).get("files", {}))

    def _manifest(self, name: str) -> dict:
        try:
            return json.loads(self.manifest_path(name).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def reusable(self, name: str, key: str, verify: bool = False) -> dict | None:
        """The stage's recorded info when `name` was finished with this key and every file it listed
        is unchanged (by size and modification time; with `verify`, by its bytes hashed again);
        None otherwise."""
        try:
            manifest = json.loads(self.manifest_path(name).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if manifest.get("key") != key:
            return None
        out = self.root / name
        ok = all(unchanged(out / rel, record, verify) for rel, record in manifest["files"].items())
        return manifest.get("info", {}) if ok else None

    @contextlib.contextmanager
    def commit(self, name: str, parts: dict, info: dict) -> Iterator[Path]:
        """Yield a fresh directory; on success it becomes ROOT/name, described by a manifest of
        `parts` (the inputs and settings that produced it, and their key) and `info` (filled in by
        the caller meanwhile). The old manifest goes before the old output, so no manifest ever
        describes files that are not there."""
        manifest = self.manifest_path(name)
        with building(self.root / name) as tmp:
            yield tmp
            files = files_record(tmp)
            manifest.unlink(missing_ok=True)
        manifest.parent.mkdir(exist_ok=True)  # only now: a run whose first stage failed leaves no DIR/manifests
        record = {"stage": name, "key": key_of(**parts), "produced_by": parts, "files": files, "info": info}
        write_file(manifest, json.dumps(record, indent=2, default=str))
