"""A GPTQ checkpoint as a model computing in float32 with exactly the weights it stores.

Every row of the drift report is scored at one precision. A GPTQ kernel computes in its own (Marlin:
float16, where Gemma-family activations overflow), so the GPTQ row is instead a plain transformers
model of the checkpoint's architecture: every tensor the checkpoint stores loaded as stored (with
transformers' own key conversions), every quantized layer held as it is stored, integer levels and
float16 scales (qmerge.quant.rtn.RoundedLinear, an eighth of a float32 copy at 4 bits), its weight
made in float32 as the layer runs (exact: qmerge.quant.gptq_weights) at the bits the checkpoint's
per-module overrides (`dynamic`) gave it, a module they keep 16-bit read as its stored weight, fused MoE experts turned into
per-expert layers first (qmerge.models.architecture.linear_layers). Nothing is left as initialised: a tensor the
model expects that neither the checkpoint nor a quantized layer provides is an error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qmerge.errors import QmergeError
from qmerge.io.checkpoint import LazyCheckpoint
from qmerge.models.architecture import linear_layers
from qmerge.models.float32 import float32_compute
from qmerge.models.loading import load_problem
from qmerge.quant.dynamic import Setting, resolve
from qmerge.quant.gptq_weights import SUFFIXES, layer_tensors, stored_levels
from qmerge.quant.rtn import RoundedLinear


def quantized_layers(path: Path) -> list[str]:
    """The layers a GPTQ checkpoint stores quantized (those with a qweight)."""
    return sorted({k.removesuffix(".qweight") for k in LazyCheckpoint.open(path).keys() if k.endswith(".qweight")})


def stores_gptq_v1(path: Path) -> bool:
    """A checkpoint in GPTQ's v1 format (qmerge's own and most published ones): load_float32 reads it."""
    return _gptq_v1(json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {})


def _gptq_v1(qc: dict) -> bool:
    return qc.get("quant_method") == "gptq" and qc.get("checkpoint_format", qc.get("format", "gptq")) == "gptq"


@torch.no_grad()
def load_float32(path: Path, device: torch.device, trust_remote_code: bool = False) -> torch.nn.Module:
    """The GPTQ v1 checkpoint in `path` as a float32-computing model of its stored weights."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    qc = dict(config.quantization_config)
    if not _gptq_v1(qc):
        raise QmergeError(f"{path} is not a GPTQ v1 checkpoint (quantization_config {qc.get('quant_method')}/{qc.get('checkpoint_format', qc.get('format'))}); qmerge scores format gptq")
    del config.quantization_config
    model, info = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype="auto", device_map={"": device}, output_loading_info=True, trust_remote_code=trust_remote_code,
    )
    names = quantized_layers(path)
    ckpt = LazyCheckpoint.open(path)
    lacking = sorted({f"{n}.{s}" for n in names for s in SUFFIXES} - set(ckpt.keys()))
    if lacking:
        raise QmergeError(f"the GPTQ checkpoint ({path}) lacks tensor {lacking[0]} of a quantized layer; re-run the GPTQ stage")
    linears = linear_layers(model, names)
    _check_covered(model, info, set(names), path)
    base = Setting(qc["bits"], qc["group_size"])
    for name, linear in linears.items():  # held as stored (levels and scales), the float32 weight made as each runs
        bits = resolve(qc.get("dynamic"), name, base).bits  # per-module overrides: what GPTQModel quantized this layer with
        levels, scales, g_idx = (t.to(device) for t in stored_levels(layer_tensors(ckpt, name), bits))
        model.set_submodule(name, RoundedLinear(levels, scales, linear.bias, g_idx))
    return float32_compute(model).eval()


def _check_covered(model: torch.nn.Module, info: dict, quantized: set[str], path: Path) -> None:
    """Every tensor the load missed is a quantized layer's weight (now dequantized), every tensor it
    ignored one of a quantized layer's GPTQ tensors; anything else is refused by name."""
    aux = {f"{name}.{s}" for name in quantized for s in SUFFIXES}
    modules = dict(model.named_modules())
    uncovered = [k for k in info.get("missing_keys") or () if not _filled(k.rpartition(".")[0], quantized, modules)]
    stray = sorted(set(info.get("unexpected_keys") or ()) - aux)
    problem = load_problem({"missing_keys": uncovered, "unexpected_keys": stray, "mismatched_keys": info.get("mismatched_keys"), "error_msgs": info.get("error_msgs")})
    if problem is not None:
        raise QmergeError(f"the GPTQ checkpoint ({path}) {problem}; re-run the GPTQ stage")


def _filled(module: str, quantized: set[str], modules: dict) -> bool:
    """A module is filled when it is a quantized layer, or (fused experts, now per-expert layers)
    every linear layer under it is."""
    if module in quantized:
        return True
    below = [n for n, m in modules.items() if n.startswith(f"{module}.") and isinstance(m, torch.nn.Linear)]
    return bool(below) and all(n in quantized for n in below)
