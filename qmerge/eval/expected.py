"""PEFT's own merge of the adapters into the base as the adapter saw it, one module at a time.

`merge_and_unload()` on a float32 copy of the base needs that copy whole (4 bytes per parameter: 33 GB
for an 8B model, 280 GB for 70B). The same result comes module by module: every bitsandbytes
Linear4bit of the loaded base is swapped for a float32 nn.Linear whose weight is a one-element
placeholder (a 16-bit base for a plain LoRA is upcast module by module instead), PEFT wraps that skeleton (so it dispatches its plain float LoRA layers, as it would on
a float32 copy), and then, in PEFT's own unload order (`_unload_and_optionally_merge`), each module's
placeholder gets bitsandbytes' dequantization of its own 4-bit weight just before PEFT's `merge` runs
on it; the merged tensors are handed out and the module is dropped. At most one module is float32.

Tensors shared by several modules (tied embeddings) are handed out last, as merge_and_unload's
state_dict shows them after every merge.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from qmerge.merge.adapter import Mix
from qmerge.models.base import held_weight
from qmerge.models.reference import peft_model


def peft_merged(base: torch.nn.Module, mix: Mix) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, float32 tensor) of PEFT's merge_and_unload of `mix` into `base` (a load_base model, the
    base as the adapter saw it), every key of its state_dict, one module's worth at a time."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    sources = _skeleton(base)
    model = peft_model(base, mix).base_model.model
    tuners = {key for key, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    shared = _shared(model)
    seen: set[str] = set()
    deferred: dict[str, torch.Tensor] = {}
    for key in [k for k, _ in model.named_modules() if not _under(k.rpartition(".")[0], tuners)]:
        try:
            target = model.get_submodule(key)
        except AttributeError:  # inside a module replaced before
            continue
        unloaded = _merged(target, sources)
        for name, module, tensor in _tensors(target if unloaded is None else unloaded, recurse=unloaded is not None):
            full = f"{key}.{name}" if key else name
            if full in seen:
                continue
            if id(tensor) in shared:  # a tied tensor goes out last, as state_dict shows it after every merge
                deferred[full] = tensor
                continue
            seen.add(full)
            weight4 = sources.get(id(module)) if name.rpartition(".")[2] == "weight" else None  # a Linear4bit PEFT left unwrapped
            yield full, held_weight(weight4).float() if weight4 is not None else tensor.detach().float()
        if unloaded is not None:
            parent, _, child = key.rpartition(".")
            setattr(model.get_submodule(parent), child, torch.nn.Identity())  # nothing of it is needed again
    for key, tensor in deferred.items():
        if key not in seen:
            yield key, tensor.detach().float()


def _merged(target: torch.nn.Module, sources: dict[int, torch.nn.Module]) -> torch.nn.Module | None:
    """PEFT's unload (with merge) of one module, as `_unload_and_optionally_merge` does it; None for a
    module PEFT leaves alone."""
    if not (hasattr(target, "unload_and_optionally_merge_module") or hasattr(target, "base_layer")):
        return None
    for module in target.modules():
        if id(module) in sources:
            module.weight = torch.nn.Parameter(held_weight(sources.pop(id(module))).float(), requires_grad=False)
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32:  # a 16-bit base (plain LoRA): PEFT merges in float32
                param.data = param.data.float()
    if hasattr(target, "unload_and_optionally_merge_module"):
        return target.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
    target.merge(safe_merge=False, adapter_names=None)
    return target.get_base_layer()


def _tensors(module: torch.nn.Module, recurse: bool) -> Iterator[tuple[str, torch.nn.Module, torch.Tensor]]:
    """(name, owning module, tensor) of the parameters and persistent buffers state_dict would list."""
    for prefix, owner in module.named_modules() if recurse else [("", module)]:
        items = [*owner.named_parameters(recurse=False), *((n, b) for n, b in owner.named_buffers(recurse=False) if n not in owner._non_persistent_buffers_set)]
        for name, tensor in items:
            yield (f"{prefix}.{name}" if prefix else name), owner, tensor


def _skeleton(base: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Every bitsandbytes Linear4bit of `base` replaced by a float32 nn.Linear holding a one-element
    weight placeholder (and the real bias); returns placeholder id → the Linear4bit it stands for."""
    import bitsandbytes as bnb

    sources = {}
    for name, module in list(base.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            weight = torch.zeros(1, device=module.weight.device).expand(module.out_features, module.in_features)
            linear.weight = torch.nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                linear.bias = torch.nn.Parameter(module.bias.detach().float(), requires_grad=False)
            base.set_submodule(name, linear)
            sources[id(linear)] = module
    return sources


def _shared(model: torch.nn.Module) -> set[int]:
    """Ids of the parameters reachable under more than one name (tied embeddings)."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    return {i for i, n in counts.items() if n > 1}


def _under(key: str, prefixes: set[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)
