"""A PEFT LoRA adapter as per-module weight deltas, validated against the base before any heavy work.

scale·B·A per target module, with PEFT's own rules for the scale: lora_alpha / r, lora_alpha / √r
with rslora, rank_pattern / alpha_pattern matched by PEFT's `get_pattern_key`. Features this
release does not merge are refused by name rather than skipped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key

from qmerge.checkpoint import LazyCheckpoint, PickledCheckpoint
from qmerge.errors import QmergeError

PREFIX = "base_model.model."
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices",
}


@dataclass(frozen=True)
class LoraModule:
    """One LoRA target: the base weight it adds to and the factors of its delta."""

    base_key: str  # e.g. model.layers.0.self_attn.q_proj.weight
    a: torch.Tensor  # r × in
    b: torch.Tensor  # out × r
    scale: float

    def delta(self, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale·B·A, computed in `dtype` on `device` (float32: the adapter trains in float32)."""
        return (self.b.to(device, dtype) @ self.a.to(device, dtype)) * self.scale


@dataclass(frozen=True)
class Adapter:
    directory: Path
    config: dict
    modules: dict[str, LoraModule]  # by base_key

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def load_adapter(directory: Path, allow_pickle: bool = False) -> Adapter:
    """Read adapter_config.json and adapter_model.safetensors; refuse what cannot be merged."""
    directory = Path(directory)
    if not directory.is_dir():
        raise QmergeError(f"adapter directory {directory} does not exist; pass the folder PEFT's save_pretrained wrote")
    config_path = directory / "adapter_config.json"
    if not config_path.exists():
        raise QmergeError(f"{config_path} is missing; pass the folder PEFT's save_pretrained wrote (it holds adapter_config.json)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise QmergeError(f"{config_path} is not valid JSON ({e}); restore the file PEFT wrote") from e
    weights, pickled = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    _refuse_unsupported(config, config_path)
    if weights.exists():
        tensors = dict(LazyCheckpoint.file(weights).items())
    elif pickled.exists() and allow_pickle:
        tensors = dict(PickledCheckpoint([pickled]).items())
    elif pickled.exists():
        raise QmergeError(f"{directory} holds adapter_model.bin (pickle, runs code when loaded); pass --allow-pickle if you trust it, or re-save with safe_serialization=True")
    else:
        raise QmergeError(f"{weights} is missing; pass the folder PEFT's save_pretrained wrote")
    return Adapter(directory, config, _lora_modules(config, tensors, config_path))


_TYPES = {  # field -> (accepted types, description)
    "r": ((int,), "a positive integer"),
    "lora_alpha": ((int, float), "a positive number"),
    "use_rslora": ((bool,), "true or false"),
    "fan_in_fan_out": ((bool,), "true or false"),  # PEFT ignores it for nn.Linear, as qmerge does
    "rank_pattern": ((dict,), "a mapping of module patterns to ranks"),
    "alpha_pattern": ((dict,), "a mapping of module patterns to alphas"),
}


def _check_types(config: dict, path: Path) -> None:
    """adapter_config.json values of the wrong type or range are refused by name, never a traceback."""
    if not isinstance(config, dict):
        raise QmergeError(f"{path} must hold a JSON object; restore the file PEFT wrote")
    for field, (types, what) in _TYPES.items():
        value = config.get(field)
        if value is None:
            continue
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise QmergeError(f"{path}: {field} = {value!r} must be {what}; fix adapter_config.json")
    for field in ("rank_pattern", "alpha_pattern"):
        for pattern, value in (config.get(field) or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise QmergeError(f"{path}: {field}[{pattern!r}] = {value!r} must be a positive number; fix adapter_config.json")
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if value is not None and value <= 0:
            raise QmergeError(f"{path}: {field} = {value!r} must be positive; fix adapter_config.json")


def _refuse_unsupported(config: dict, path: Path) -> None:
    _check_types(config, path)
    if config.get("peft_type", "LORA") != "LORA":
        raise QmergeError(f"{path}: peft_type {config.get('peft_type')!r} is not LoRA; qmerge merges LoRA adapters only")
    for field, name in _UNSUPPORTED.items():
        if config.get(field):
            raise QmergeError(f"{path}: {name} is not supported by this qmerge release; train without it or merge with PEFT")


def _lora_modules(config: dict, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, LoraModule]:
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for key in tensors:
        if "lora_embedding_" in key:
            raise QmergeError(f"{path.parent}: LoRA on an embedding layer ({key}) is not supported by this qmerge release")
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        a, b = tensors[key], tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise QmergeError(f"{path.parent}: {key} has no lora_B partner; the adapter file is incomplete, re-save it")
        try:
            r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), r_default)
            alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), alpha_default)
        except re.error as e:
            raise QmergeError(f"{path}: a rank_pattern/alpha_pattern key is not a valid regular expression ({e}); fix adapter_config.json") from e
        if a.dim() != 2 or b.dim() != 2 or not a.is_floating_point() or not b.is_floating_point():
            raise QmergeError(f"{path.parent}: {name} lora_A/lora_B are not 2-D float matrices; the adapter file is damaged, re-save it")
        if a.shape[0] != r or b.shape[1] != r:
            raise QmergeError(f"{path.parent}: {name} has rank {a.shape[0]} in its weights but r={r} in adapter_config.json; fix r/rank_pattern")
        if r <= 0 or alpha <= 0:
            raise QmergeError(f"{path.parent}: {name} has r={r}, lora_alpha={alpha}; both must be positive")
        for t, which in ((a, "lora_A"), (b, "lora_B")):
            if not torch.isfinite(t).all():
                raise QmergeError(f"{path.parent}: {name}.{which} holds NaN or Inf; the training run diverged, use an earlier checkpoint")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[f"{name}.weight"] = LoraModule(f"{name}.weight", a, b, scale)
    if not modules:
        raise QmergeError(f"{path.parent}: no lora_A/lora_B weights found in adapter_model.safetensors; is this a LoRA adapter?")
    return modules


def check_fits(adapter: Adapter, base: LazyCheckpoint) -> None:
    """Every LoRA target exists in the base with the shape its factors imply."""
    keys = set(base.keys())
    for key, mod in adapter.modules.items():
        if key not in keys:
            raise QmergeError(f"adapter targets {key}, which the base does not have; is the adapter for this base model?")
        out_f, in_f = base.shape(key)
        if mod.b.shape[0] != out_f or mod.a.shape[1] != in_f:
            raise QmergeError(
                f"adapter's {key} is {mod.b.shape[0]}x{mod.a.shape[1]} but the base's is {out_f}x{in_f}; the adapter was trained on another model"
            )
