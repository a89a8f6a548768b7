"""The structure of a transformers model that family-specific layouts need: where a layer a checkpoint
names lives in the model, and whether transformers can hold a quantized layer there at all.

transformers 5 holds the experts of MoE models fused, as 3-D parameters of one module (Qwen2-MoE,
Qwen3-MoE, Mixtral), while checkpoints and GPTQModel name one linear layer per expert. GPTQModel's
own tool for this, defuser, turns the fused experts back into per-expert nn.Linear modules (same
function); qmerge uses it wherever it needs those layers as modules.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from qmerge.errors import QmergeError
from qmerge.models.engine import transformers_unpatched


def linear_layers(model: torch.nn.Module, names) -> dict[str, torch.nn.Linear]:
    """The nn.Linear modules called `names` (checkpoint names), defusing fused experts when the model
    holds some of them fused; a name that is still no linear layer is refused."""
    found = _linears(model, names)
    if len(found) < len(set(names)):
        import defuser

        with transformers_unpatched(model.config.model_type):  # this model converted, no class of the process patched
            defuser.convert_model(model)
        found = _linears(model, names)
    missing = sorted(set(names) - set(found))
    if missing:
        raise QmergeError(f"the model has no linear layer {missing[0]} (named by the checkpoint); this architecture's layout is not supported")
    return found


def _linears(model: torch.nn.Module, names) -> dict[str, torch.nn.Linear]:
    modules = dict(model.named_modules())
    return {n: modules[n] for n in names if isinstance(modules.get(n), torch.nn.Linear)}


def transformers_holds(config, names, trust_remote_code: bool = False) -> bool:
    """Whether transformers' model of `config` has an nn.Linear for every layer in `names`: only there
    can its GPTQ loader put a quantized layer (it has none for fused MoE experts)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return len(_linears(model, names)) == len(set(names))


def converted_at_load(config, keys, trust_remote_code: bool = False) -> bool:
    """Whether transformers holds some of the checkpoint's tensors `keys` under other names (fused MoE
    experts, renamed keys): its model of `config` has no parameter or buffer of that name."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return bool(set(keys) - set(model.state_dict()))
