"""Tensor-by-tensor checkpoint I/O: lazy safetensors reading, and HF-style sharded writing with an
index that puts each tensor on disk as it comes, so a merge holds one tensor at a time, whatever
the model's size (a model larger than host memory merges).

Modelled on mergekit's lazy tensor loader and shard writer.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qmerge.errors import QmergeError
from qmerge.io.dtypes import BY_TORCH

INDEX_NAME = "model.safetensors.index.json"


class LazyCheckpoint:
    """The tensors of a safetensors checkpoint (one file or an indexed set of shards), read on demand."""

    def __init__(self, file_of: dict[str, Path]):
        self._file_of = file_of
        self._headers: dict[Path, object] = {}  # handles for shapes only: their tensor pages are never touched

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
        path = self._file_of[key]
        if path not in self._headers:
            self._headers[path] = self._open(path)
        return tuple(self._headers[path].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[key]

    def get_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Several tensors, each file they are in opened once (a GPTQ layer's four tensors: one
        header parse instead of four, which for a checkpoint of a thousand tensors costs more than
        reading them)."""
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._file_of[key], []).append(key)
        for path, wanted in by_file.items():
            with self._open(path) as f:
                for key in wanted:
                    try:
                        out[key] = f.get_tensor(key)
                    except (SafetensorError, OSError) as e:
                        raise QmergeError(f"cannot read {key} from {path}: {e}; re-download or re-save the checkpoint") from e
        return out

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, copied out of the file: safetensors hands out tensors backed by a private
        mapping of the whole file, and a caller keeping thousands of them (an adapter) would keep as
        many mappings, each counting its pages toward RSS."""
        for key in self._file_of:
            yield key, self.get(key).clone()

    @staticmethod
    def _open(path: Path):
        """A fresh handle per read: safetensors memory-maps the file, and the pages a kept-open handle
        has read stay in the process's RSS, which would then grow with the model's size."""
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise QmergeError(f"cannot read {path}: {e}; re-download or re-save the checkpoint") from e


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

    def get_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return {key: self._tensors[key] for key in keys}


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


# A shard's JSON header is written last, once its tensors are known, into space kept at the front of
# the file (the safetensors format allows trailing spaces in the header). 64 KiB holds ~600 Llama
# tensor entries; a shard whose header would outgrow it is closed early, like a full one.
HEADER_BYTES = 64 * 1024



class ShardWriter:
    """Writes tensors into `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes`,
    then renames them to their final HF names and writes the index (or a single model.safetensors).

    Each tensor goes to disk as it is added (only the shard's header is kept in memory), so host
    memory stays flat in the model's size: a buffered shard would hold up to `max_shard_bytes`.
    Written pages are flushed every `sync_bytes`: dirty page cache counts toward a container's
    memory limit, and a cgroup v1 limit OOM-kills a writer whose dirty pages it cannot write back
    in time (clean pages it simply reclaims)."""

    def __init__(self, directory: Path, max_shard_bytes: int = 2 * 1024**3, header_bytes: int = HEADER_BYTES, sync_bytes: int = 64 * 1024**2):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.header_bytes = header_bytes
        self.sync_bytes = sync_bytes
        self._unsynced = 0
        self._file = None  # the open shard
        self._header: dict[str, dict] = {}
        self._header_len = 0  # of the open shard's header as JSON
        self._offset = 0  # bytes of tensor data in the open shard
        self._shards: list[list[str]] = []
        self._total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._file is not None and (self._offset + data.nbytes > self.max_shard_bytes or self._header_len + _entry_len(key, tensor, self._offset) > self.header_bytes):
            self._close()
        if self._file is None:
            self._open()
        entry_len = _entry_len(key, tensor, self._offset)
        if self._header_len + entry_len > self.header_bytes:
            raise QmergeError(f"tensor name {key[:60]!r}... is too long for a safetensors shard header; shorten the model's module names")
        self._header[key] = _entry(tensor, self._offset)
        self._header_len += entry_len
        self._file.write(memoryview(data))
        self._offset += data.nbytes
        self._total_bytes += data.nbytes
        self._unsynced += data.nbytes
        if self._unsynced >= self.sync_bytes:
            self._file.flush()
            os.fdatasync(self._file.fileno())
            self._unsynced = 0

    def finish(self) -> list[Path]:
        if self._file is None and not self._shards:
            self._open()
        if self._file is not None:
            self._close()
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

    def _open(self) -> None:
        self._file = open(self._temp_name(len(self._shards)), "wb")
        self._file.seek(8 + self.header_bytes)
        self._header = {"__metadata__": {"format": "pt"}}
        self._header_len = len(json.dumps(self._header, separators=(",", ":")))
        self._offset = 0

    def _close(self) -> None:
        """Write the header into the space kept for it, padded with spaces as the format allows."""
        header = json.dumps(self._header, separators=(",", ":")).encode()
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self.header_bytes) + header.ljust(self.header_bytes, b" "))
        self._file.close()
        self._file = None
        self._shards.append([k for k in self._header if k != "__metadata__"])


def _entry(tensor: torch.Tensor, offset: int) -> dict:
    if tensor.dtype not in BY_TORCH:
        raise QmergeError(f"cannot write a {tensor.dtype} tensor to safetensors; use --merged-dtype bfloat16, float16 or float32")
    return {"dtype": BY_TORCH[tensor.dtype].code, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.numel() * tensor.element_size()]}


def _entry_len(key: str, tensor: torch.Tensor, offset: int) -> int:
    """Bytes the entry adds to the compact JSON header (with its separating comma)."""
    return len(json.dumps({key: _entry(tensor, offset)}, separators=(",", ":"))) - 1
