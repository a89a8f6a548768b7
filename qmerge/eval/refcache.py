"""What the drift metrics need from the reference's forward, kept so the reference runs once per eval
window for all candidates: per eval batch, each layer's hidden state (B, T, H) in float32 (the last
row is the normed final hidden state, from which the reference's logits are projected again a span
of positions at a time: H floats per position instead of a vocabulary's worth). The drift stage
keeps each candidate's final hidden states in one too (one "layer"), for the token statistics it
takes of all candidates in one pass.

Held in memory when the whole cache fits `budget_bytes`, otherwise on disk, one file per batch with
its layers one after another, read back a layer at a time with plain reads: the page cache holds
them (clean, reclaimable pages, not the process's resident set). The values read back are the
bytes written, so metrics are bit-identical to recomputing the reference.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

Key = tuple[int, int]  # (eval set, first window of the batch)


class ReferenceCache:
    """`put` each layer of each batch once (in layer order), then `get` them any number of times."""

    def __init__(self, total_bytes: int, budget_bytes: int, directory: Path | None = None):
        self.on_disk = total_bytes > budget_bytes
        self.total_bytes = total_bytes
        self._memory: dict[tuple[Key, int], torch.Tensor] = {}
        self._shapes: dict[Key, tuple[int, ...]] = {}
        self._dir: Path | None = None
        if self.on_disk:
            if directory is not None:
                Path(directory).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="refcache-", dir=directory))

    @property
    def where(self) -> str:
        return f"disk ({self._dir})" if self.on_disk else "memory"

    def put(self, key: Key, layer: int, hidden: torch.Tensor) -> None:
        hidden = hidden.detach().to("cpu", torch.float32).contiguous()
        self._shapes.setdefault(key, tuple(hidden.shape))
        if not self.on_disk:
            self._memory[key, layer] = hidden.clone() if hidden.untyped_storage().size() != hidden.nbytes else hidden
            return
        with open(self._file(key), "ab") as f:
            f.write(memoryview(hidden.numpy()).cast("B"))
            f.flush()
            os.fdatasync(f.fileno())  # dirty pages count toward a container's limit until written back

    def get(self, key: Key, layer: int) -> torch.Tensor:
        if not self.on_disk:
            return self._memory[key, layer]
        shape = self._shapes[key]
        out = torch.empty(shape, dtype=torch.float32)
        view = memoryview(out.numpy()).cast("B")
        with open(self._file(key), "rb") as f:
            f.seek(layer * out.nbytes)
            if f.readinto(view) != out.nbytes:
                raise RuntimeError(f"reference cache {self._file(key)} is truncated")
        return out

    def close(self) -> None:
        self._memory.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ReferenceCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _file(self, key: Key) -> Path:
        return self._dir / f"set{key[0]}-window{key[1]}.f32"
