"""The reference: the model as trained, the base as the adapter saw it with the adapters unmerged,
run by PEFT itself; and PEFT's own 4-bit merge made from it."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from qmerge.io.memory import trim
from qmerge.merge.adapter import Mix
from qmerge.models.base import load_base
from qmerge.models.engine import gptqmodel
from qmerge.models.placement import Placement
from qmerge.settings import NF4Settings


def peft_model(model: torch.nn.Module, mix: Mix):
    """The mix as PEFT runs it, unmerged: each adapter loaded under its own name, all active at once,
    each layer's scaling multiplied by its weight. LoRA layers sum their active adapters' outputs, so
    this is exactly base + Σ weight·Δ (qmerge.merge.edits refuses mixes that are not a linear combination)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    gptqmodel()  # PEFT imports it while setting up the model: import it here, where its tracebacks are dropped
    names = ["default", *(f"adapter{i}" for i in range(1, len(mix)))]
    peft = PeftModel.from_pretrained(model, mix[0].adapter.directory)
    for name, part in zip(names[1:], mix[1:]):
        peft.load_adapter(part.adapter.directory, adapter_name=name)
    if len(mix) > 1:
        peft.base_model.set_adapter(names)
    for layer in peft.modules():
        if isinstance(layer, LoraLayer):
            for name, part in zip(names, mix):
                if name in layer.scaling:
                    layer.scaling[name] *= part.weight
    return peft


def load_reference(base_dir: Path, mix: Mix, nf4: NF4Settings, device: torch.device | Placement, trust_remote_code: bool = False, kind: str = "qlora"):
    """Base as the adapter saw it (qlora: quantized by bitsandbytes at load, or pre-quantized; lora:
    16-bit) + the adapters, unmerged: the model as trained."""
    return peft_model(load_base(base_dir, nf4, device, kind, trust_remote_code), mix).eval()


def peft_nf4(reference: torch.nn.Module) -> torch.nn.Module:
    """PEFT's own merge on the 4-bit model (what merge_and_unload does): dequantize, add the delta, and
    re-round the sum to NF4, a second rounding the adapter never saw. Made from a copy of the QLoRA
    reference (a "qlora" load_reference), which spares bitsandbytes quantizing the base once more;
    merged layer by layer with freed memory handed back as it goes (each layer's float32 temporaries
    otherwise fragment the heap: +1.2 GB resident for a 160M model on CPU), then unloaded.

    The copy shares with the reference every tensor outside the adapted layers (embeddings, head,
    norms, layers the adapter does not touch), which the merge neither reads nor replaces: held in
    float32 they are most of a large-vocabulary reference (6.3 GB of a Llama-3-8B's on CPU)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = {id(t) for m in reference.modules() if isinstance(m, BaseTunerLayer) for t in (*m.parameters(), *m.buffers())}
    model = copy.deepcopy(reference, {id(t): t for t in (*reference.parameters(), *reference.buffers()) if id(t) not in adapted})
    for i, layer in enumerate(m for m in model.modules() if isinstance(m, BaseTunerLayer)):
        layer.merge()
        if i % 8 == 7:
            trim()
    return model.unload().eval()
