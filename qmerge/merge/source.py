"""The base's tensors as the adapter saw them, one at a time: the NF4 round trip of a 16-bit base's
quantized linear weights (every other tensor as stored), or a pre-quantized checkpoint's stored
4-bit codes dequantized; with into="original", the 16-bit weights themselves."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from qmerge.errors import QmergeError
from qmerge.io.checkpoint import LazyCheckpoint
from qmerge.merge.nf4 import quantized_linear_names, round_trip
from qmerge.merge.prequantized import CPU, Prequantized
from qmerge.settings import NF4Settings


def is_prequantized(config: AutoConfig) -> bool:
    """A base whose config carries a quantization_config (inputs.load_base_config lets through
    bitsandbytes 4-bit only)."""
    return bool(getattr(config, "quantization_config", None))


class RoundTrip:
    """A 16-bit base whose quantized linear weights read as their round trip (the values bitsandbytes'
    forward computes with, in the training compute dtype, on the device asked for); every other
    tensor reads as stored. One tensor at a time, as LazyCheckpoint reads."""

    def __init__(self, base: LazyCheckpoint, quantized: set[str], nf4: NF4Settings):
        self.base, self.quantized, self.nf4 = base, frozenset(quantized), nf4

    def keys(self) -> list[str]:
        return self.base.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def get(self, key: str, device: torch.device = CPU) -> torch.Tensor:
        tensor = self.base.get(key)
        return round_trip(tensor, self.nf4, device) if key in self.quantized else tensor



Source = RoundTrip | Prequantized


def as_trained(base_dir: Path, config: AutoConfig, nf4: NF4Settings, into: str = "nf4", allow_pickle: bool = False,
               trust_remote_code: bool = False) -> Source:
    """The base's tensors as the adapter saw them: into="nf4" the 4-bit weights (round trip of a
    16-bit base, or a pre-quantized checkpoint dequantized), into="original" the 16-bit weights."""
    base = LazyCheckpoint.open(base_dir, allow_pickle)
    if is_prequantized(config):
        if into != "nf4":
            raise QmergeError(f"{base_dir} is a pre-quantized 4-bit checkpoint: it has no original 16-bit weights to merge into; use --merge-into nf4 or pass the 16-bit base")
        return Prequantized(base, config)
    quantized = {f"{n}.weight" for n in quantized_linear_names(config, nf4, trust_remote_code)} if into == "nf4" else set()
    unstored = sorted(quantized - set(base.keys()))
    if unstored:  # transformers renames this checkpoint's tensors at load: which stored tensor it quantized is unknown
        raise QmergeError(f"bitsandbytes quantizes {unstored[0].removesuffix('.weight')}, but the checkpoint stores no {unstored[0]} (transformers converts its tensor names at load); this layout is not supported")
    return RoundTrip(base, quantized, nf4)


_FLAG = {"blocksize": "--nf4-blocksize"}


def effective_settings(config: AutoConfig, source: Source, nf4: NF4Settings, given: tuple[str, ...]) -> NF4Settings:
    """The 4-bit settings of the run. A pre-quantized base decides them itself; a setting the user
    gave (`given`: NF4Settings field names) that disagrees with it is refused by name, because the
    adapter was trained on the stored tensors, whatever the flags say."""
    if not isinstance(source, Prequantized):
        return nf4
    stored = source.settings()
    for name in given:
        mine, theirs = getattr(nf4, name), getattr(stored, name)
        if mine != theirs:
            flag = _FLAG.get(name, "--" + name.replace("_", "-"))
            raise QmergeError(f"{flag} {mine!r} conflicts with the pre-quantized base's {theirs!r}; drop {flag}: the checkpoint's own quantization decides")
    return stored
