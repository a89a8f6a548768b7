"""Which linear layers GPTQ quantizes, read from GPTQModel's own model definition (its module tree:
per decoder layer, the modules it quantizes, experts expanded), named as the checkpoint names them.

That set is not the one bitsandbytes quantized: GPTQModel leaves MoE routers and shared-expert gates
in float and quantizes the experts bitsandbytes cannot (transformers 5 holds them fused, as 3-D
parameters). RTN, sizes, bits per weight and the group-size check use this set. GPTQModel also
splits some fused linears before quantizing (defuser: Phi-3's gate_up_proj into gate_proj and
up_proj); such a layer is one layer here, under the fused name the checkpoint stores, and
qmerge.quant.layout writes it back fused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from qmerge.errors import QmergeError
from qmerge.io.checkpoint import LazyCheckpoint
from qmerge.models.engine import gptqmodel

# the fused layer defuser splits, and its parts in the fused layer's row order (defuser's "standard"
# split: the first half of gate_up_proj's rows is the gate, as Phi-3's forward chunks it)
FUSED_PARTS = {"gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class GPTQLayers:
    shapes: dict[str, tuple[int, int]]  # every layer GPTQ quantizes, as the checkpoint names it → (out, in)
    fused: dict[str, tuple[str, ...]]  # a layer stored fused → the layers GPTQModel quantizes in its place, in row order
    layers_node: str  # the module holding the decoder layers (model.layers)


def definition(config):
    """GPTQModel's model definition for this architecture, or a one-line refusal."""
    gptqmodel()
    from gptqmodel.models.auto import MODEL_MAP

    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_MAP:
        raise QmergeError(f"GPTQModel 7.7 has no model definition for architecture {model_type!r}; pass --skip-gptq to merge and measure without GPTQ")
    return MODEL_MAP[model_type]


def gptq_layers(config, shapes: dict[str, tuple[int, ...]]) -> GPTQLayers:
    """The layers GPTQModel quantizes in a checkpoint of `config` whose tensors have `shapes` (key →
    shape). A module of the definition the checkpoint does not hold is skipped, as GPTQModel skips it
    (the definition lists optional modules, e.g. the MoE block of a dense layer)."""
    model = definition(config)
    nodes = model.extract_layers_node()
    if len(nodes) != 1:
        raise QmergeError(f"architecture {config.model_type!r} has {len(nodes)} stacks of decoder layers (a multimodal model?); qmerge quantizes one; pass --skip-gptq")
    config_of_text = getattr(config, "text_config", None) or config
    modules = dict.fromkeys(m for block in model.simple_layer_modules(config, gptqmodel().QuantizeConfig()) for m in block)
    out: dict[str, tuple[int, int]] = {}
    fused: dict[str, tuple[str, ...]] = {}
    for layer in range(config_of_text.num_hidden_layers):
        for module in modules:
            name = f"{nodes[0]}.{layer}.{module}"
            if f"{name}.weight" in shapes:
                out[name] = tuple(shapes[f"{name}.weight"])
                continue
            whole = _fused_name(name, shapes)
            if whole is not None:
                out[whole] = tuple(shapes[f"{whole}.weight"])
                parent = whole.rpartition(".")[0]
                fused[whole] = tuple(f"{parent}.{part}" for part in FUSED_PARTS[whole.rpartition(".")[2]])
    if not out:
        raise QmergeError(f"GPTQModel's definition for {config.model_type!r} names no layer this checkpoint stores; pass --skip-gptq")
    return GPTQLayers(out, fused, nodes[0])


def of_checkpoint(directory: Path, trust_remote_code: bool = False) -> GPTQLayers:
    """gptq_layers of a float checkpoint on disk (DIR/merged)."""
    ckpt = LazyCheckpoint.open(directory)
    return gptq_layers(AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code), {k: ckpt.shape(k) for k in ckpt.keys()})


def _fused_name(name: str, shapes: dict) -> str | None:
    """The fused layer the checkpoint stores in place of `name`, one of the parts defuser splits it into."""
    parent, _, leaf = name.rpartition(".")
    for whole, parts in FUSED_PARTS.items():
        if leaf in parts and f"{parent}.{whole}.weight" in shapes:
            return f"{parent}.{whole}"
    return None
