"""Tensor-by-tensor checkpoint I/O: lazy (memory-mapped) safetensors reading, and HF-style sharded
writing with an index, so a merge never holds more than one tensor plus one shard buffer.

Modelled on mergekit's lazy tensor loader and shard writer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qmerge.errors import QmergeError

INDEX_NAME = "model.safetensors.index.json"


class LazyCheckpoint:
    """The tensors of a safetensors checkpoint (one file or an indexed set of shards), read on demand."""

    def __init__(self, file_of: dict[str, Path]):
        self._file_of = file_of
        self._handles: dict[Path, object] = {}

    @classmethod
    def open(cls, directory: Path, allow_pickle: bool = False) -> "LazyCheckpoint":
        """A model directory: `model.safetensors` or shards listed in the index; pickled
        `pytorch_model*.bin` only with allow_pickle (loaded with torch's weights_only unpickler)."""
        directory = Path(directory)
        index, single = directory / INDEX_NAME, directory / "model.safetensors"
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise QmergeError(f"{index} has no weight_map; restore the file")
            return cls({k: directory / v for k, v in weight_map.items()})
        if single.exists():
            return cls.file(single)
        pickles = sorted(directory.glob("pytorch_model*.bin"))
        if pickles and allow_pickle:
            return PickledCheckpoint(pickles)
        hint = f" (found {pickles[0].name}: pickle weights run code when loaded; pass --allow-pickle if you trust them, or convert to safetensors)" if pickles else ""
        raise QmergeError(f"no model.safetensors or {INDEX_NAME} in {directory}{hint}")

    @classmethod
    def file(cls, path: Path) -> "LazyCheckpoint":
        """One safetensors file (a single-file model, or an adapter's weights)."""
        return cls({k: Path(path) for k in _keys(Path(path))})

    def keys(self) -> list[str]:
        return list(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[key]).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        path = self._file_of[key]
        try:
            return self._open(path).get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise QmergeError(f"cannot read {key} from {path}: {e}; re-download or re-save the checkpoint") from e

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._file_of:
            yield key, self.get(key)

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise QmergeError(f"cannot read {path}: {e}; re-download or re-save the checkpoint") from e
        return self._handles[path]


class PickledCheckpoint(LazyCheckpoint):
    """Pickled shards, read whole (torch.load cannot read one tensor at a time) with weights_only."""

    def __init__(self, files: list[Path]):
        self._tensors: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                self._tensors.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:  # torch raises many types for a bad pickle
                raise QmergeError(f"cannot read {f} ({type(e).__name__}); re-save the checkpoint as safetensors") from e
        super().__init__(dict.fromkeys(self._tensors, files[0]))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise QmergeError(f"cannot read {path}: {e}; re-download or re-save the checkpoint") from e


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QmergeError(f"cannot read {path}: {e}; fix or restore the file") from e


class ShardWriter:
    """Writes tensors into `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes`,
    then renames them to their final HF names and writes the index (or a single model.safetensors)."""

    def __init__(self, directory: Path, max_shard_bytes: int = 2 * 1024**3):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[key] = tensor.contiguous()
        self._buffer_bytes += nbytes
        self._total_bytes += nbytes

    def finish(self) -> list[Path]:
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = [self.directory / "model.safetensors"]
        else:
            final = [self.directory / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, path in enumerate(final):
            os.replace(self._temp_name(i), path)
        if n > 1:
            weight_map = {k: p.name for keys, p in zip(self._shards, final) for k in keys}
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return final

    def _temp_name(self, i: int) -> Path:
        return self.directory / f".shard-{i:05d}.safetensors.tmp"

    def _flush(self) -> None:
        save_file(self._buffer, str(self._temp_name(len(self._shards))), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer = {}
        self._buffer_bytes = 0
