"""Outputs that appear whole or not at all: a directory is built in a hidden sibling, fsynced, and
renamed over its final name only when complete, so a crash, a full disk or an interrupt never
leaves half an output where a finished one is expected, and an existing output (replaced under
--overwrite) is removed only after its successor is in place."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from qmerge.errors import QmergeError

PARTIAL, OLD = ".partial-", ".old-"  # infixes of qmerge's own hidden names (clean_partials removes them)


@contextlib.contextmanager
def building(out: Path) -> Iterator[Path]:
    """Yield a fresh hidden sibling of `out` to write into; when the block ends without error it
    becomes `out`. On error it is removed, and a full disk becomes a one-line QmergeError."""
    out = Path(out)
    tmp = out.parent / f".{out.name}{PARTIAL}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise QmergeError(f"no space left on the device writing {out}; free space or choose another --out (earlier outputs are intact)") from e
        raise


def replace_dir(work: Path, out: Path) -> None:
    """Move a finished directory into place; an existing one is removed only after the new one is there."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}{OLD}{os.getpid()}"
        os.replace(out, old)
    os.replace(work, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_partials(root: Path) -> None:
    """Remove what a killed run left half-written under `root` (only qmerge's own hidden names)."""
    for p in [*root.glob(f".*{PARTIAL}*"), *root.glob(f".*{OLD}*")]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def write_file(path: Path, text: str) -> None:
    """A file replaced whole: written beside, fsynced, renamed over `path`."""
    staging = path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")
    staging.write_text(text)
    with open(staging, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(staging, path)
    fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)
