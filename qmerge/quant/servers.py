"""What the servers a user deploys to can load, decided from the GPTQ settings and the model's shapes
before any quantization: GPTQ kernels refuse a group size that does not divide every in_features,
and vLLM/SGLang serve GPTQ through Marlin, which takes symmetric 4- or 8-bit weights only."""

from __future__ import annotations

from dataclasses import replace

from qmerge.errors import QmergeError
from qmerge.settings import GPTQSettings

AUTO_GROUP_SIZES = (128, 64, 32)  # --group-size auto: the largest of these dividing every in_features


def resolve_group_size(shapes: dict[str, tuple[int, ...]], gptq: GPTQSettings) -> tuple[GPTQSettings, str | None]:
    """The GPTQ settings with the group size decided, and a line saying what auto chose (None when
    the user chose). `shapes`: (out, in) of every layer GPTQ quantizes."""
    if gptq.group_size != "auto":
        check_group_size(shapes, gptq)
        return gptq, None
    sizes = {shape[1] for shape in shapes.values()}
    fits = [g for g in AUTO_GROUP_SIZES if all(n % g == 0 for n in sizes)]
    if not fits:
        odd = min(sizes, key=lambda n: (n & -n, n))
        raise QmergeError(f"--group-size auto: none of {', '.join(map(str, AUTO_GROUP_SIZES))} divides in_features {odd} of this model's quantized layers; pass --group-size -1 (per channel) or 16")
    line = f"group size auto → {fits[0]}: the largest of {', '.join(map(str, AUTO_GROUP_SIZES))} dividing every quantized layer's in_features"
    return replace(gptq, group_size=fits[0]), line


def check_group_size(shapes: dict[str, tuple[int, ...]], gptq: GPTQSettings) -> None:
    """GPTQ kernels refuse a checkpoint whose in_features a group does not divide (SmolLM2: 576 % 128):
    find that out now, not after quantizing."""
    if gptq.group_size == -1:
        return
    bad = sorted({shape[1] for shape in shapes.values() if shape[1] % gptq.group_size})
    if bad:
        fits = [g for g in (128, 64, 32, 16) if all(s[1] % g == 0 for s in shapes.values())]
        hint = f"--group-size {fits[0]}" if fits else "--group-size -1"
        raise QmergeError(f"--group-size {gptq.group_size} does not divide in_features {bad[0]} of this model's linear layers; use {hint} (or auto)")


def servers(gptq: GPTQSettings, in_features: set[int], loader: str = "transformers") -> dict[str, dict]:
    """Which servers load a checkpoint of these settings, and why not where they do not.

    transformers (through GPTQModel) loads every format qmerge writes, where it has a linear layer for
    each quantized one (`loader` "gptqmodel": fused MoE experts, which only GPTQModel's own loader
    defuses); vLLM and SGLang serve GPTQ on NVIDIA GPUs through gptq_marlin, which takes symmetric 4-
    or 8-bit weights whose group size divides every quantized layer's in_features."""
    marlin = []
    if gptq.bits not in (4, 8):
        marlin.append(f"{gptq.bits}-bit (Marlin takes 4 or 8)")
    if not gptq.sym:
        marlin.append("asymmetric (Marlin takes sym only)")
    if gptq.group_size != -1 and any(n % gptq.group_size for n in in_features):
        marlin.append(f"group size {gptq.group_size} does not divide every in_features")
    why = "; ".join(marlin)
    fused_experts = "transformers 5 holds this model's MoE experts fused and has no place for per-expert GPTQ layers; GPTQModel.load does (checked)"
    return {
        "transformers": {"loads": True, "why": "GPTQModel kernels (Marlin on CUDA, torch on CPU); checked"} if loader == "transformers" else {"loads": False, "why": fused_experts},
        "vllm": {"loads": not marlin, "why": why or "gptq_marlin"},
        "sglang": {"loads": not marlin, "why": why or "gptq_marlin"},
    }


def check_target(gptq: GPTQSettings, in_features: set[int], loader: str = "transformers") -> None:
    """Refuse, before any work, settings the chosen server cannot load."""
    if gptq.target != "any":
        verdict = servers(gptq, in_features, loader)[gptq.target]
        if not verdict["loads"]:
            raise QmergeError(f"--target {gptq.target} cannot load this checkpoint: {verdict['why']}; change the GPTQ settings or the target")
