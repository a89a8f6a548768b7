"""GPTQModel's per-module overrides (`QuantizeConfig.dynamic`): written, resolved and checked here.

A `dynamic` maps regex patterns over full module names to overrides: `+:PATTERN` (or a bare
pattern) quantizes the matching modules with the given fields instead of the run's, `-:PATTERN`
keeps them 16-bit. The first pattern (in order) whose regex matches the start of the name decides.
GPTQModel's QuantizeConfig keeps unknown fields without a word and its processor ignores them, so a
misspelt field would quantize a module with settings nobody asked for: the fields are checked here.

Servers load less than GPTQModel writes: vLLM and SGLang serve GPTQ through Marlin (symmetric 4- or
8-bit, group size -1/32/64/128), and they fuse q/k/v and gate/up into one matrix each, which must
then share one setting (their own fused checkpoints' `qkv_proj` / `gate_up_proj` are one module
already). 5/6/7-bit (and 2/3-bit) switch GPTQModel to packings only transformers-through-GPTQModel loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qmerge.errors import QmergeError
from qmerge.settings import GPTQSettings

# The fields GPTQModel's GPTQ processor reads per module (gptqmodel/looper/gptq_processor.py), with
# the Python type each takes.
FIELDS = {"bits": int, "group_size": int, "sym": bool, "desc_act": bool, "mse": float, "damp_percent": float, "act_group_aware": bool, "static_groups": bool}
MARLIN_BITS = (4, 8)
MARLIN_GROUPS = (-1, 32, 64, 128)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # what vLLM/SGLang fuse, under their fused names


@dataclass(frozen=True)
class Setting:
    """One module's quantization: what a server's kernel choice depends on."""

    bits: int
    group_size: int
    sym: bool = True
    desc_act: bool = False

    def label(self) -> str:
        return f"{self.bits}-bit g{self.group_size}" + ("" if self.sym else " asym") + (" act-order" if self.desc_act else "")


KEEP = None  # a module kept in 16 bits (`-:` pattern)


def base_setting(gptq: GPTQSettings) -> Setting:
    return Setting(gptq.bits, gptq.group_size, gptq.sym, gptq.desc_act)


def pattern(modules: list[str]) -> str:
    """An anchored regex matching exactly these full module names (never a longer name)."""
    return "^(?:" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"


def write(allocation: dict[str, Setting | None], base: Setting, extra: dict | None = None) -> dict:
    """The `dynamic` of an allocation (module → Setting, or KEEP for 16-bit): one pattern per setting
    that differs from the base, with `extra` fields (such as mse) on every `+:` override."""
    by_setting: dict[Setting | None, list[str]] = {}
    for module, setting in allocation.items():
        if setting != base:
            by_setting.setdefault(setting, []).append(module)
    out = {}
    for setting, modules in sorted(by_setting.items(), key=lambda kv: (kv[0] is None, kv[0].label() if kv[0] else "")):
        if setting is KEEP:
            out["-:" + pattern(modules)] = {}
        else:
            out["+:" + pattern(modules)] = {"bits": setting.bits, "group_size": setting.group_size, "sym": setting.sym, "desc_act": setting.desc_act, **(extra or {})}
    return out


def validate(dynamic: dict) -> None:
    """Refuse patterns GPTQModel would not compile and fields it would ignore, before any work."""
    if not isinstance(dynamic, dict):
        raise QmergeError(f"dynamic must map module-name patterns to overrides, not {type(dynamic).__name__}")
    for key, overrides in dynamic.items():
        raw = key[2:] if key.startswith(("+:", "-:")) else key
        try:
            re.compile(raw)
        except re.error as e:
            raise QmergeError(f"dynamic pattern {key!r} is not a regular expression ({e}); fix the pattern") from None
        if not isinstance(overrides, dict):
            raise QmergeError(f"dynamic pattern {key!r} must map to a dict of fields ({', '.join(FIELDS)})")
        for name, value in overrides.items():
            if name not in FIELDS:
                raise QmergeError(f"dynamic pattern {key!r} sets {name!r}, a field GPTQModel ignores; use {', '.join(FIELDS)}")
            kind = FIELDS[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                if not (kind is float and isinstance(value, int) and not isinstance(value, bool)):
                    raise QmergeError(f"dynamic pattern {key!r}: {name} must be {kind.__name__}, not {value!r}")


def resolve(dynamic: dict | None, module: str, base: Setting) -> Setting | None:
    """The setting `module` gets (KEEP: 16-bit), decided as GPTQModel decides it: the first pattern
    whose regex matches at the start of the name."""
    for key, overrides in (dynamic or {}).items():
        raw = key[2:] if key.startswith(("+:", "-:")) else key
        if re.match(raw, module):
            if key.startswith("-:"):
                return KEEP
            return Setting(
                overrides.get("bits", base.bits), overrides.get("group_size", base.group_size), overrides.get("sym", base.sym), overrides.get("desc_act", base.desc_act)
            )
    return base


def violations(dynamic: dict | None, base: Setting, shapes: dict[str, tuple[int, int]], target: str) -> list[str]:
    """Why a checkpoint of `base` with `dynamic` would not load in `target` (empty: it loads).

    Every target: a group size must divide the module's in_features. transformers/any: nothing more.
    vllm/sglang: Marlin's bits, symmetry and group sizes, and fused siblings sharing one setting."""
    settings = {m: resolve(dynamic, m, base) for m in shapes}
    why = []
    for module, s in settings.items():
        if s is not KEEP and s.group_size != -1 and shapes[module][1] % s.group_size:
            why.append(f"{module}: group size {s.group_size} does not divide in_features {shapes[module][1]}")
    if target not in ("vllm", "sglang"):
        return why
    for module, s in settings.items():
        if s is KEEP:
            continue
        if s.bits not in MARLIN_BITS:
            why.append(f"{module}: {s.bits}-bit (Marlin takes 4 or 8)")
        if not s.sym:
            why.append(f"{module}: asymmetric (Marlin takes sym only)")
        if s.group_size not in MARLIN_GROUPS:
            why.append(f"{module}: group size {s.group_size} (Marlin takes -1, 32, 64, 128)")
    for members in FUSED.values():
        for module in settings:
            prefix, _, leaf = module.rpartition(".")
            if leaf == members[0]:
                siblings = {settings.get(f"{prefix}.{m}", "absent") for m in members} - {"absent"}
                if len(siblings) > 1:
                    why.append(f"{prefix}.{{{','.join(members)}}}: {target} fuses them, but they differ ({', '.join(sorted(s.label() if s else '16-bit' for s in siblings))})")
    return why


def check(dynamic: dict | None, gptq: GPTQSettings, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse a `dynamic` that GPTQModel would misread or the target server could not load."""
    if dynamic:
        validate(dynamic)
    why = violations(dynamic, base_setting(gptq), shapes, gptq.target)
    if why:
        raise QmergeError(f"--target {gptq.target} cannot load this per-module allocation: {why[0]}" + (f" (and {len(why) - 1} more)" if len(why) > 1 else ""))


def describe(dynamic: dict | None, base: Setting, modules: list[str]) -> dict[str, str]:
    """Per module, what it got ("4-bit g64", "16-bit"): the model card's and the report's words."""
    return {m: (s.label() if s is not KEEP else "16-bit") for m in modules for s in [resolve(dynamic, m, base)]}


def servers_with(verdicts: dict[str, dict], dynamic: dict | None, gptq: GPTQSettings, shapes: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """The servers' verdicts (qmerge.quant.servers) for a checkpoint with per-module overrides:
    transformers' from_pretrained builds every layer at the top-level bits and refuses the 8-bit
    tensors (size mismatch), GPTQModel's own loader reads them; vLLM/SGLang as the rules above say."""
    if not dynamic:
        return verdicts
    out = {**verdicts, "transformers": {"loads": False, "why": "per-module overrides (dynamic): transformers' from_pretrained refuses them; load with GPTQModel.load"}}
    for server in ("vllm", "sglang"):
        why = violations(dynamic, base_setting(gptq), shapes, server)
        out[server] = {"loads": verdicts[server]["loads"] and not why, "why": "; ".join(why) or verdicts[server]["why"] + " with dynamic overrides"}
    return out
