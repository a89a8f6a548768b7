"""A PEFT LoRA adapter as per-tensor edits of the base, validated against the base before any heavy work.

Every tensor PEFT's LoRA saves becomes an edit of one base tensor (qmerge.merge.lora): scale·B·A on linear
layers, embeddings and lm_head (scale alpha/r, alpha/√r with rslora, rank_pattern/alpha_pattern
matched by PEFT's `get_pattern_key`), DoRA's magnitude, lora_bias, modules_to_save and
trainable_token_indices. Which modules were targeted (target_modules as a list, a regex or
"all-linear", layers_to_transform, layers_pattern, exclude_modules) needs no rule of its own: the
saved tensors name them. Features that change the forward in ways this release does not merge are
refused by name rather than skipped.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key

from qmerge.io.checkpoint import LazyCheckpoint, PickledCheckpoint
from qmerge.errors import QmergeError
from qmerge.io.inputs import resolve
from qmerge.merge.lora import ORDER, Edit, LoraBias, LoraDelta, Replace, TokenRows
from qmerge.merge.source import Source

PREFIX = "base_model.model."
_LORA = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B")
_TOKENS = ".token_adapter.trainable_tokens_delta"
_UNSUPPORTED = {  # LoraConfig fields (PEFT 0.21) that change the forward in ways qmerge does not merge
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}
# init_lora_weights that subtract the initial adapter from the base weights (or, for MiCA, select a variant)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


@dataclass(frozen=True)
class Adapter:
    directory: Path
    config: dict
    edits: dict[str, tuple[Edit, ...]]  # base tensor name -> its edits, in qmerge.merge.lora.ORDER

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def linear(self) -> bool:
        """True when the adapter only adds deltas (LoRA and lora_bias: no DoRA, replaced tensors or token
        rows), so it can be scaled and mixed with others as a linear combination."""
        return all(isinstance(e, LoraBias) or isinstance(e, LoraDelta) and e.magnitude is None for es in self.edits.values() for e in es)


@dataclass(frozen=True)
class Weighted:
    """One `--adapter DIR:WEIGHT` of a mix: the merge adds Σ weight·Δ."""

    adapter: Adapter
    weight: float = 1.0


Mix = tuple[Weighted, ...]


def parse_spec(spec: str) -> tuple[str, float]:
    """"DIR_OR_HUB_ID:WEIGHT" -> (DIR_OR_HUB_ID, WEIGHT); without ":WEIGHT" the weight is 1."""
    where, sep, weight = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        value = float(weight)
    except ValueError:
        return spec, 1.0  # a ':' that is part of the path
    if not math.isfinite(value) or value == 0:
        raise QmergeError(f"--adapter {spec}: weight {weight} must be a finite non-zero number, as in --adapter DIR:0.5")
    return where, value


def load_mix(specs: tuple[str, ...], allow_pickle: bool = False) -> Mix:
    """Every `--adapter DIR[:WEIGHT]` resolved (local folder or hub id), loaded and validated."""
    return tuple(Weighted(load_adapter(resolve(where, "adapter"), allow_pickle), weight) for where, weight in map(parse_spec, specs))


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
    return Adapter(directory, config, _edits(config, tensors, config_path))


_TYPES = {  # field -> (accepted types, description)
    "r": ((int,), "a positive integer"),
    "lora_alpha": ((int, float), "a positive number"),
    "use_rslora": ((bool,), "true or false"),
    "fan_in_fan_out": ((bool,), "true or false"),  # PEFT ignores it for nn.Linear, as qmerge does
    "rank_pattern": ((dict,), "a mapping of module patterns to ranks"),
    "alpha_pattern": ((dict,), "a mapping of module patterns to alphas"),
    "use_dora": ((bool,), "true or false"),
    "lora_bias": ((bool,), "true or false"),
    "ensure_weight_tying": ((bool,), "true or false"),
    "modules_to_save": ((list,), "a list of module names"),
    "trainable_token_indices": ((list, dict), "a list of token ids or a mapping of layer names to token ids"),
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
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise QmergeError(
            f"{path}: init_lora_weights={init!r} changed the base weights (or the forward) at initialization; "
            "convert the adapter with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) first"
        )


def _edits(config: dict, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[Edit, ...]]:
    """Group the saved tensors by the base tensor they edit (PEFT's key layout, PREFIX stripped)."""
    lora: defaultdict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    found: defaultdict[str, list[Edit]] = defaultdict(list)
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise QmergeError(f"{path.parent}: {key} is not a float tensor; the adapter file is damaged, re-save it")
        if not torch.isfinite(tensor).all():
            raise QmergeError(f"{path.parent}: {key} holds NaN or Inf; the training run diverged, use an earlier checkpoint")
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in _LORA if name.endswith(s)), None)
        if suffix is not None:
            lora[name.removesuffix(suffix)][suffix] = tensor
        elif name.endswith(_TOKENS):
            module = name.removesuffix(_TOKENS)
            found[f"{module}.weight"].append(_token_rows(module, tensor, config, path))
        else:  # modules_to_save, biases trained with bias="all", embedding layers saved with their LoRA
            found[name.replace(".base_layer.", ".")].append(Replace(tensor))
    for module, parts in lora.items():
        for key, edit in _lora_edits(module, parts, config, path):
            found[key].append(edit)
    if not found:
        raise QmergeError(f"{path.parent}: no LoRA weights found in adapter_model.safetensors; is this a LoRA adapter?")
    for key, edits in found.items():
        if any(isinstance(e, TokenRows) for e in edits) and len(edits) > 1:
            raise QmergeError(f"{path.parent}: {key} has trainable tokens and other changes at once; this qmerge release merges trainable tokens alone on a layer")
    return {key: tuple(sorted(edits, key=lambda e: ORDER.index(type(e)))) for key, edits in found.items()}


def _lora_edits(module: str, parts: dict[str, torch.Tensor], config: dict, path: Path) -> list[tuple[str, Edit]]:
    embedding = ".lora_embedding_A" in parts or ".lora_embedding_B" in parts
    a, b = (parts.get(".lora_embedding_A"), parts.get(".lora_embedding_B")) if embedding else (parts.get(".lora_A.weight"), parts.get(".lora_B.weight"))
    if a is None or b is None:
        raise QmergeError(f"{path.parent}: {module} lacks lora_A or lora_B; the adapter file is incomplete, re-save it")
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    try:
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r_default)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha_default)
    except re.error as e:
        raise QmergeError(f"{path}: a rank_pattern/alpha_pattern key is not a valid regular expression ({e}); fix adapter_config.json") from e
    if a.dim() != 2 or b.dim() != 2:
        raise QmergeError(f"{path.parent}: {module} lora_A/lora_B are not 2-D matrices; the adapter file is damaged, re-save it")
    if a.shape[0] != r or b.shape[1] != r:
        raise QmergeError(f"{path.parent}: {module} has rank {a.shape[0]} in its weights but r={r} in adapter_config.json; fix r/rank_pattern")
    if r <= 0 or alpha <= 0:
        raise QmergeError(f"{path.parent}: {module} has r={r}, lora_alpha={alpha}; both must be positive")
    magnitude, bias = parts.get(".lora_magnitude_vector"), parts.get(".lora_B.bias")
    _consistent(config, "use_dora", "lora_magnitude_vector", magnitude, module, path)
    _consistent(config, "lora_bias", "lora_B.bias", bias, module, path)
    if magnitude is not None and (embedding or magnitude.shape != (b.shape[0],)):
        raise QmergeError(f"{path.parent}: {module}: DoRA on an embedding layer, or a magnitude vector of the wrong length, is not supported by this qmerge release")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    edits: list[tuple[str, Edit]] = [(f"{module}.weight", LoraDelta(a, b, scale, embedding, magnitude))]
    if bias is not None:
        edits.append((f"{module}.bias", LoraBias(bias, scale)))
    return edits


def _consistent(config: dict, field: str, tensor_name: str, tensor: torch.Tensor | None, module: str, path: Path) -> None:
    """A feature's config flag and its saved tensor come together; one without the other is a damaged adapter."""
    if bool(config.get(field)) != (tensor is not None):
        raise QmergeError(f"{path.parent}: {module} {'lacks' if tensor is None else 'has'} {tensor_name} but {field} is {bool(config.get(field))}; re-save the adapter or fix adapter_config.json")


def _token_rows(module: str, rows: torch.Tensor, config: dict, path: Path) -> TokenRows:
    """The rows PEFT's TrainableTokensLayer saved, at the token ids adapter_config.json lists for this layer."""
    spec = config.get("trainable_token_indices")
    if isinstance(spec, dict):
        spec = next((ids for name, ids in spec.items() if module == name or module.endswith(f".{name}")), None)
    if not isinstance(spec, list) or not spec or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in spec):
        raise QmergeError(f"{path}: trainable_token_indices gives no token ids for {module}; fix adapter_config.json")
    if rows.dim() != 2 or rows.shape[0] != len(spec):
        raise QmergeError(f"{path.parent}: {module} saved {tuple(rows.shape)} token rows for {len(spec)} token ids; re-save the adapter")
    return TokenRows(tuple(spec), rows)


def check_fits(adapter: Adapter, base: Source, aliases: dict[str, str] | None = None) -> None:
    """Every tensor the adapter edits exists in the base with the shape the adapter implies.

    aliases: tensors the checkpoint does not store because they share another's (a tied lm_head)."""
    keys, aliases = set(base.keys()), aliases or {}
    for key, edits in adapter.edits.items():
        stored = aliases.get(key, key)
        if stored not in keys:
            if any(isinstance(e, LoraBias) for e in edits):
                raise QmergeError(f"adapter has lora_bias for {key}, but that base layer has no bias; train without lora_bias or use a base with biases")
            raise QmergeError(f"adapter targets {key}, which the base does not have; is the adapter for this base model?")
        shape = base.shape(stored)
        for edit in edits:
            implied = edit.misfit(shape)
            if implied is not None:
                raise QmergeError(f"adapter's {key} is {implied} but the base's is {'x'.join(map(str, shape))}; the adapter was trained on another model")
