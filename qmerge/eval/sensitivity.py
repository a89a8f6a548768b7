"""Which modules' quantization moves the model most: the search's ranking, one cheap exact probe.

The probe starts from the plain GPTQ checkpoint (every module at the run's bits) and, for one group
of modules at a time, puts back their float weights from DIR/merged, measuring the mean KLD against
the reference on a few calibration windows. The drop is what that group's quantization costs *at the
operating point*, interactions with every other quantized module included, and it bounds what
promoting the group to 8 bits can buy (8-bit GPTQ leaves about 1/256 of 4-bit's squared error).
Why not GPTQ's own per-module losses: they are output errors of one layer in its own units
(down_proj's are orders larger than k_proj's) and say nothing about the logits; why not the report's
per-layer hidden-state drift: it is per layer, not per module, and accumulates all earlier layers.
The cost is one forward of a few windows per group, with no GPTQ run; calibration windows (not the
eval set the budget is judged on) so the choice is not fitted to the numbers that judge it. A group
in decoder layer l leaves layers 0…l−1 as they were, so those replay their outputs from the plain
forward instead of computing them again: the same logits, and with groups spread evenly over the
depth about half the layers computed per probe forward.

Groups are what a server must treat alike: q/k/v of one layer (vLLM and SGLang fuse them), gate/up
(fused too), and every other linear module on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import contextlib
from collections.abc import Iterator

import torch

from qmerge.eval.metrics import chunk_stats
from qmerge.models.taps import decoder_layers
from qmerge.quant.dynamic import FUSED

FUSED_GROUPS = {part: whole for whole, parts in FUSED.items() for part in parts}  # q_proj → qkv_proj: the servers' rule (quant.dynamic)


def groups(modules: list[str]) -> dict[str, list[str]]:
    """Module groups that share one setting, by name (`model.layers.3.self_attn.qkv_proj` → its q/k/v projections)."""
    out: dict[str, list[str]] = {}
    for module in modules:
        prefix, _, leaf = module.rpartition(".")
        out.setdefault(f"{prefix}.{FUSED_GROUPS.get(leaf, leaf)}", []).append(module)
    return out


@torch.inference_mode()
def probe(reference: torch.nn.Module, quantized: torch.nn.Module, floating: torch.nn.Module, windows: torch.Tensor, members: dict[str, list[str]],
          progress: Callable[[str], None] = lambda _: None) -> tuple[float, dict[str, float]]:
    """(mean KLD of `quantized` on `windows`, per group the KLD drop when its modules take their
    weights from `floating`)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    ref_logits = reference(input_ids=inputs, use_cache=False).logits

    def kld() -> float:
        logits = quantized(input_ids=inputs, use_cache=False).logits
        return chunk_stats(ref_logits, logits, targets).kld.mean().item()  # a few short windows: their logits whole

    layers = decoder_layers(quantized)
    outputs: list = []
    hooks = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for layer in layers]
    try:
        plain = kld()
    finally:
        for hook in hooks:
            hook.remove()
    index = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    gains = {}
    for i, (group, modules) in enumerate(members.items()):
        first = min(index.get(id(quantized.get_submodule(m)), 0) for m in modules)  # outside every layer: replay none
        saved = {m: _swap(quantized, m, floating.get_submodule(m)) for m in modules}
        with _replayed(layers[:first], outputs):
            gains[group] = plain - kld()
        for m, module in saved.items():
            _swap(quantized, m, module)
        progress(f"sensitivity {i + 1}/{len(members)}")
    return plain, gains


@contextlib.contextmanager
def _replayed(layers: list[torch.nn.Module], outputs: list) -> Iterator[None]:
    """While the block runs, each of `layers` returns its recorded output instead of computing it."""
    for layer, out in zip(layers, outputs):
        layer.forward = lambda *_a, _out=out, **_k: _out
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _swap(model: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    """Put `new` at `name` in `model`; returns what was there."""
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent)
    old = getattr(owner, leaf)
    setattr(owner, leaf, new)
    return old
