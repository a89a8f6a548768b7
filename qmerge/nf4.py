"""The weights the adapter was trained against: bitsandbytes' 4-bit round trip of every linear layer
that transformers would have quantized at load time, or the stored tensors of a checkpoint that
bitsandbytes already quantized (the `*-bnb-4bit` layout transformers saves).

QLoRA trains against dequantize(quantize_nf4(W)), not W. bitsandbytes packs the same 4-bit codes
whatever the input dtype (bf16 or its exact float32 upcast); only the dequantized output's rounding
depends on it, so the round trip (and the dequantization of stored codes) runs in float32 and yields
the exact NF4 values, which the float32 reference model computes with too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from qmerge.checkpoint import LazyCheckpoint
from qmerge.errors import QmergeError
from qmerge.rss import release
from qmerge.settings import NF4Settings

_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPE[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bnb_config(nf4: NF4Settings, compute_dtype: str | None = None) -> BitsAndBytesConfig:
    """The BitsAndBytesConfig of the training run (compute dtype overridable for evaluation)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=nf4.quant_type,
        bnb_4bit_use_double_quant=nf4.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype or nf4.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(nf4.quant_storage),
        llm_int8_skip_modules=list(nf4.skip_modules) or None,
    )


def quantized_linear_names(config: AutoConfig, nf4: NF4Settings, trust_remote_code: bool = False) -> set[str]:
    """Module names transformers turns into bnb Linear4bit at load, decided by transformers itself
    (its quantizer's modules_to_not_convert: lm_head, tied/output embeddings, _keep_in_fp32_modules,
    the user's skip list) on a weightless model, so qmerge and the training run agree by construction."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    quantizer = Bnb4BitHfQuantizer(bnb_config(nf4))
    skip = quantizer.get_modules_to_not_convert(model, quantizer.quantization_config.llm_int8_skip_modules, model._keep_in_fp32_modules)
    model = replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=quantizer.quantization_config)
    return {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def round_trip(weight: torch.Tensor, nf4: NF4Settings, device: torch.device) -> torch.Tensor:
    """dequantize(quantize_4bit(W)) with bitsandbytes' own kernels, as float32 on `device`."""
    import bitsandbytes.functional as F

    w = weight.to(device=device, dtype=torch.float32)
    packed, state = F.quantize_4bit(
        w,
        blocksize=nf4.blocksize,
        compress_statistics=nf4.double_quant,
        quant_type=nf4.quant_type,
        quant_storage=torch_dtype(nf4.quant_storage),
    )
    return F.dequantize_4bit(packed, state)


def prequantized(config: AutoConfig) -> bool:
    """A base whose config carries a quantization_config (inputs.load_base_config lets through
    bitsandbytes 4-bit only)."""
    return bool(getattr(config, "quantization_config", None))


CPU = torch.device("cpu")


class RoundTrip:
    """A 16-bit base whose quantized linear weights read as their round trip (float32 on the device
    asked for); every other tensor reads as stored. One tensor at a time, as LazyCheckpoint reads."""

    def __init__(self, base: LazyCheckpoint, quantized: set[str], nf4: NF4Settings):
        self.base, self.quantized, self.nf4 = base, frozenset(quantized), nf4

    def keys(self) -> list[str]:
        return self.base.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def get(self, key: str, device: torch.device = CPU) -> torch.Tensor:
        tensor = self.base.get(key)
        return round_trip(tensor, self.nf4, device) if key in self.quantized else tensor


_STATE = ".quant_state.bitsandbytes__"
_AUX = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class Prequantized:
    """A checkpoint bitsandbytes quantized to 4 bits and transformers saved: per quantized weight the
    packed codes plus absmax, quant_map, nested_absmax/nested_quant_map (double quantization) and
    quant_state.bitsandbytes__nf4|fp4 (blocksize, dtype, logical shape). The auxiliary tensors are
    hidden; a quantized weight reads as bitsandbytes' dequantization of the stored tensors, in float32
    (the stored dtype would round the exact 4-bit values)."""

    def __init__(self, base: LazyCheckpoint):
        self.base = base
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
        return F.dequantize_4bit(self.base.get(key).to(device), state)

    def settings(self, config: AutoConfig) -> NF4Settings:
        """The 4-bit settings the stored tensors were made with: type, double quantization and
        blocksize from every layer's stored state (one set for the whole model), storage from the
        packed tensors' dtype, compute dtype and skip list from the config's quantization_config."""
        found = {(s["quant_type"], "nested_blocksize" in s, s["blocksize"]) for s in map(self.state, self.quantized)}
        if len(found) != 1:
            raise QmergeError(f"the pre-quantized base mixes 4-bit settings across layers ({sorted(found)}); qmerge needs one setting for the whole model")
        quant_type, double_quant, blocksize = found.pop()
        storage = self.base.get(min(self.quantized)).dtype  # transformers packs every layer into the one bnb_4bit_quant_storage
        qc = config.quantization_config
        return NF4Settings(
            quant_type=quant_type, double_quant=double_quant, blocksize=blocksize, quant_storage=dtype_name(storage),
            compute_dtype=str(qc.get("bnb_4bit_compute_dtype", "float32")).removeprefix("torch."),
            skip_modules=tuple(qc.get("llm_int8_skip_modules") or ()),
        )


def _owner(key: str) -> str | None:
    """The weight an auxiliary 4-bit tensor belongs to (its key minus the suffix), None for others."""
    if _STATE in key:
        return key.split(_STATE)[0]
    head, _, tail = key.rpartition(".")
    return head if tail in _AUX else None


Source = RoundTrip | Prequantized


def as_trained(base_dir: Path, config: AutoConfig, nf4: NF4Settings, into: str = "nf4", allow_pickle: bool = False,
               trust_remote_code: bool = False) -> Source:
    """The base's tensors as the adapter saw them: into="nf4" the 4-bit weights (round trip of a
    16-bit base, or a pre-quantized checkpoint dequantized), into="original" the 16-bit weights."""
    base = LazyCheckpoint.open(base_dir, allow_pickle)
    if prequantized(config):
        if into != "nf4":
            raise QmergeError(f"{base_dir} is a pre-quantized 4-bit checkpoint: it has no original 16-bit weights to merge into; use --merge-into nf4 or pass the 16-bit base")
        return Prequantized(base)
    quantized = {f"{n}.weight" for n in quantized_linear_names(config, nf4, trust_remote_code)} if into == "nf4" else set()
    return RoundTrip(base, quantized, nf4)


_FLAG = {"blocksize": "--nf4-blocksize"}


def effective_settings(config: AutoConfig, source: Source, nf4: NF4Settings, given: tuple[str, ...]) -> NF4Settings:
    """The 4-bit settings of the run. A pre-quantized base decides them itself; a setting the user
    gave (`given`: NF4Settings field names) that disagrees with it is refused by name, because the
    adapter was trained on the stored tensors, whatever the flags say."""
    if not isinstance(source, Prequantized):
        return nf4
    stored = source.settings(config)
    for name in given:
        mine, theirs = getattr(nf4, name), getattr(stored, name)
        if mine != theirs:
            flag = _FLAG.get(name, "--" + name.replace("_", "-"))
            raise QmergeError(f"{flag} {mine!r} conflicts with the pre-quantized base's {theirs!r}; drop {flag}: the checkpoint's own quantization decides")
    return stored


REFERENCES = {"qlora": "reference (QLoRA as trained)", "lora": "reference (LoRA on the 16-bit base)"}


def reference_kind(merge_into: str) -> str:
    """The model the adapter was trained on follows the merge target: a QLoRA adapter merges into
    the 4-bit weights it saw, a plain LoRA into the 16-bit ones."""
    return "qlora" if merge_into == "nf4" else "lora"


def load_base(base_dir: Path, nf4: NF4Settings | None, device: torch.device, kind: str = "qlora", trust_remote_code: bool = False):
    """The base model the adapter was trained on, computing in float32 with the exact 4-bit values:
    kind="qlora" loaded in 4-bit by bitsandbytes (a 16-bit base quantized with the training settings
    `nf4`, a pre-quantized checkpoint as stored), kind="lora" the base as stored (the 16-bit weights;
    a pre-quantized checkpoint has no others)."""
    import bitsandbytes as bnb

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    # quantization_config only when bitsandbytes is to quantize (None would drop a checkpoint's own)
    quantize = {"quantization_config": bnb_config(nf4, compute_dtype="float32")} if kind == "qlora" and not prequantized(config) else {}
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map={"": device}, trust_remote_code=trust_remote_code, **quantize)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # a pre-quantized checkpoint's config sets its own compute dtype, and its stored state
            # dequantizes to the dtype it was saved from (bf16 rounds the exact 4-bit values)
            module.compute_dtype = torch.float32
            module.weight.quant_state.dtype = torch.float32
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight at the first forward and then
            # computes in bf16 whatever compute_dtype says; keep the float32 path the metrics assume.
            module.support_avx512bf16_for_cpu = False
    for param in model.parameters():  # transformers keeps a pre-quantized checkpoint's other tensors in their stored dtype
        if param.is_floating_point() and param.dtype != torch.float32 and not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.float()
    release()  # the float copies bitsandbytes quantized from
    return model


def held_weight(module) -> torch.Tensor:
    """What a bitsandbytes Linear4bit of a load_base model holds, dequantized with its own state.

    load_base turns bitsandbytes' CPU repacking off: the repack rounds the block scales to bf16, and
    bitsandbytes 0.50's inverse of it leaves non-nested scales transposed, so a repacked layer no
    longer holds the weights the adapter was trained against."""
    import bitsandbytes.functional as F

    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        raise RuntimeError("held_weight of a Linear4bit that bitsandbytes repacked for CPU inference; load it with qmerge.nf4.load_base")
    return F.dequantize_4bit(module.weight.data, module.weight.quant_state)


@torch.no_grad()
def dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """Every bitsandbytes Linear4bit of a load_base model replaced by a float32 nn.Linear holding its
    dequantized weight: the same function as bitsandbytes' float32 path, without dequantizing at every
    forward (several times faster on CPU), and a float model PEFT merges in float."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = held_weight(module).float()
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=weight.device)
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias.float())
            model.set_submodule(name, linear)
    return model
