"""A checkpoint bitsandbytes already quantized to 4 bits (the `*-bnb-4bit` layout transformers saves),
read tensor by tensor: its quantized weights dequantized from the stored codes and statistics, and
the 4-bit settings they were made with."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from qmerge.errors import QmergeError
from qmerge.io.checkpoint import LazyCheckpoint
from qmerge.io.dtypes import dtype_name
from qmerge.merge.nf4 import as_computed
from qmerge.settings import NF4Settings

CPU = torch.device("cpu")
_STATE = ".quant_state.bitsandbytes__"
_AUX = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class Prequantized:
    """A checkpoint bitsandbytes quantized to 4 bits and transformers saved: per quantized weight the
    packed codes plus absmax, quant_map, nested_absmax/nested_quant_map (double quantization) and
    quant_state.bitsandbytes__nf4|fp4 (blocksize, dtype, logical shape). The auxiliary tensors are
    hidden; a quantized weight reads as bitsandbytes' forward computes with it: the stored codes and
    statistics dequantized exactly, rounded to the compute dtype of the config's quantization_config
    (qmerge.merge.nf4.as_computed), whatever dtype the stored state names."""

    def __init__(self, base: LazyCheckpoint, config: AutoConfig):
        self.base = base
        qc = config.quantization_config
        self.compute_dtype = str(qc.get("bnb_4bit_compute_dtype", "float32")).removeprefix("torch.")
        self.skip_modules = tuple(qc.get("llm_int8_skip_modules") or ())
        keys = base.keys()
        self._state_key = {k.split(_STATE)[0]: k for k in keys if _STATE in k}
        self.quantized = frozenset(self._state_key)
        self._aux: dict[str, list[str]] = {w: [] for w in self.quantized}
        for key in keys:
            weight = _owner(key)
            if weight in self._aux:
                self._aux[weight].append(key)
        if not self.quantized:
            raise QmergeError(f"the base's config says bitsandbytes 4-bit but its weights hold no {_STATE.strip('.')}*; re-save the quantized model with save_pretrained")

    def keys(self) -> list[str]:
        return [k for k in self.base.keys() if _owner(k) not in self._aux]

    def state(self, key: str) -> dict:
        """The stored non-tensor quantization state of one weight (quant_type, blocksize, dtype, shape, nested_*)."""
        import bitsandbytes.functional as F

        return F.unpack_tensor_to_dict(self.base.get(self._state_key[key]))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state(key)["shape"]) if key in self.quantized else self.base.shape(key)

    def get(self, key: str, device: torch.device = CPU) -> torch.Tensor:
        if key not in self.quantized:
            return self.base.get(key)
        import bitsandbytes.functional as F

        stats = {k.removeprefix(f"{key}."): self.base.get(k) for k in self._aux[key]}
        try:
            state = F.QuantState.from_dict(stats, device)
        except (KeyError, ValueError, AssertionError) as e:
            raise QmergeError(f"{key}: its bitsandbytes quantization state is incomplete ({type(e).__name__}: {e}); re-save the quantized model") from e
        state.dtype = torch.float32
        return as_computed(F.dequantize_4bit(self.base.get(key).to(device), state), self.compute_dtype)

    def settings(self) -> NF4Settings:
        """The 4-bit settings the stored tensors were made with: type, double quantization and
        blocksize from every layer's stored state (one set for the whole model), storage from the
        packed tensors' dtype, compute dtype and skip list from the config's quantization_config."""
        found = {(s["quant_type"], "nested_blocksize" in s, s["blocksize"]) for s in map(self.state, self.quantized)}
        if len(found) != 1:
            raise QmergeError(f"the pre-quantized base mixes 4-bit settings across layers ({sorted(found)}); qmerge needs one setting for the whole model")
        quant_type, double_quant, blocksize = found.pop()
        storage = self.base.get(min(self.quantized)).dtype  # transformers packs every layer into the one bnb_4bit_quant_storage
        return NF4Settings(
            quant_type=quant_type, double_quant=double_quant, blocksize=blocksize, quant_storage=dtype_name(storage),
            compute_dtype=self.compute_dtype, skip_modules=self.skip_modules,
        )


def _owner(key: str) -> str | None:
    """The weight an auxiliary 4-bit tensor belongs to (its key minus the suffix), None for others."""
    if _STATE in key:
        return key.split(_STATE)[0]
    head, _, tail = key.rpartition(".")
    return head if tail in _AUX else None
