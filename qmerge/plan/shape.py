"""What the memory plan needs to know of a model, counted on a weightless (meta) copy built from its
config: parameters by kind, the largest tensors, one decoder layer, the widths that size activations
and logits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qmerge.merge.adapter import Mix
from qmerge.models.taps import decoder_layers


@dataclass(frozen=True)
class Shape:
    params: int  # every parameter of the model
    linear: int  # weights of the linear layers bitsandbytes quantizes (4-bit in the reference)
    largest_linear: int  # elements of the largest of those
    largest: int  # elements of the largest tensor (an embedding, usually)
    layer: int  # parameters of one decoder layer
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    adapter: int  # parameters of the adapters (held in float32)

    @property
    def other(self) -> int:
        """Parameters kept in 16 bits (or float32) in the reference: embeddings, head, norms, biases."""
        return self.params - self.linear

    def cache_bytes(self, windows: int, seq_len: int) -> int:
        """The reference cache (eval.refcache) of `windows` windows: every layer's float32 hidden state."""
        return windows * (seq_len - 1) * self.layers * self.hidden * 4


def shape_of(config, linears: dict[str, tuple[int, int]], mix: Mix, trust_remote_code: bool = False) -> Shape:
    """The Shape of a model of `config` whose quantized linear layers are `linears` (name → (out, in))."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    sizes = [p.numel() for p in model.parameters()]
    layers = decoder_layers(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    return Shape(
        params=sum(sizes),
        linear=sum(o * i for o, i in linears.values()),
        largest_linear=max((o * i for o, i in linears.values()), default=0),
        largest=max(sizes),
        layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        layers=len(layers),
        hidden=hidden,
        intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
        vocab=text.vocab_size,
        adapter=sum(_adapter_bytes(part.adapter.directory) for part in mix) // 4,
    )


def _adapter_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).glob("adapter_model*"))
