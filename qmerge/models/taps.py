"""What the drift engine reads from inside a forward pass, without transformers materialising it.

`model(ids, output_hidden_states=True)` keeps every layer's hidden state of the batch alive at once
(33 × B × T × H float32 for an 8B model) and the head computes full-vocabulary float32 logits for
the whole batch (B × T × 128256 × 4 bytes). Instead:

- `Taps.run` calls each decoder layer's output callback as the layer finishes (a forward hook), so
  a layer's hidden state can be reduced or stored and freed before the next layer runs;
- the head's input (the final, normed hidden state) is captured and the head itself runs on zero
  positions; `Taps.logits` then projects any span of positions on demand, so logits exist one chunk
  of positions at a time.

Which modules are the decoder layers is read from transformers' own record of what its
`hidden_states` output collects (`_can_record_outputs`), so the rows are the same as
`output_hidden_states` gives: layer i < L−1 is decoder layer i's output, and the last row is the
normed final hidden state (transformers ties the last hidden state to it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

from qmerge.errors import QmergeError
from qmerge.models.float32 import equal_upcast, float32_weights

LayerCallback = Callable[[int, torch.Tensor], None]


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose outputs transformers reports as hidden states, in order."""
    from transformers import PreTrainedModel

    for module in causal_lm(model).modules():
        if not isinstance(module, PreTrainedModel):
            continue
        spec = (getattr(module, "_can_record_outputs", None) or {}).get("hidden_states")
        target = getattr(spec, "target_class", spec)
        if isinstance(target, type):
            layers = [m for m in module.modules() if isinstance(m, target)]
            if layers:
                return layers
    raise QmergeError(f"{type(causal_lm(model)).__name__} does not say which modules produce its hidden states; qmerge cannot measure per-layer drift on it")


_POST_PROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # the config fields _post_process reads


def _post_process(config, logits: torch.Tensor) -> torch.Tensor:
    """What transformers' CausalLM heads do to the head's output (softcapping, logit scales)."""
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if isinstance(divisor, (int, float)) and not isinstance(divisor, bool):
        logits = logits / divisor
    return logits


def head_logits(config, head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A CausalLM's float32 logits from its head and a span of its final hidden states, computed
    where the head computes."""
    hook = getattr(head, "_hf_hook", None)  # accelerate: where the layer computes
    device = getattr(hook, "execution_device", None) or next(head.parameters()).device
    return _post_process(config, head(hidden.to(device))).float()


def same_head(a: functools.partial, b: functools.partial) -> bool:
    """Whether two `Taps.projection`s compute the same function: one head; or two linear heads that
    compute as float32 nn.Linear does (a 16-bit one upcasting per use projects exactly what a float32
    copy does: models.float32) on equal values, under the same logit post-processing. So a candidate
    carrying the base's 16-bit head is projected with the reference's float32 one, and holds nothing."""
    (config_a, head_a), (config_b, head_b) = a.args, b.args
    if head_a is head_b:
        return True
    if not (float32_weights(head_a) and float32_weights(head_b)) or any(getattr(config_a, k, None) != getattr(config_b, k, None) for k in _POST_PROCESSING):
        return False
    if (head_a.bias is None) != (head_b.bias is None):
        return False
    return equal_upcast(head_a.weight, head_b.weight) and (head_a.bias is None or equal_upcast(head_a.bias, head_b.bias))


class Taps:
    """One model's decoder layers and head, for forwards that expose each layer's output as it is
    made and the head's input instead of its logits."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        lm = causal_lm(model)
        self.config = lm.config
        self.layers = decoder_layers(model)
        self.head = lm.get_output_embeddings()
        if self.head is None:
            raise QmergeError(f"{type(lm).__name__} has no output embeddings (lm_head); qmerge measures causal language models")
        self.checked = False

    @property
    def input_device(self) -> torch.device:
        embeddings = causal_lm(self.model).get_input_embeddings()
        hook = getattr(embeddings, "_hf_hook", None)  # accelerate: where the layer computes
        device = getattr(hook, "execution_device", None)
        return torch.device(device) if device is not None else next(embeddings.parameters()).device

    def run(self, ids: torch.Tensor, on_layer: LayerCallback) -> torch.Tensor:
        """Forward `ids` (B, T); `on_layer(i, hidden)` for every decoder layer but the last, then for
        the last row with the final normed hidden state, which is also returned."""
        captured: list[torch.Tensor] = []
        with self._hooked(on_layer, captured):
            self.model(input_ids=ids.to(self.input_device), use_cache=False)
        final = captured[0]
        on_layer(len(self.layers) - 1, final)
        return final

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits for a span of positions of its final hidden state, float32, on the
        head's device."""
        return head_logits(self.config, self.head, hidden)

    def projection(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """`logits` holding the head and config only, not the model: what scores a model's final
        hidden states after the rest of it is gone."""
        return functools.partial(head_logits, self.config, self.head)

    def check_head(self, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """Once per model: logits from the captured hidden state agree with the model's own on a
        short prefix; an architecture that post-processes its logits in another way is refused
        rather than measured wrong."""
        if self.checked:
            return
        k = min(16, ids.shape[1])
        own = self.model(input_ids=ids[:1, :k].to(self.input_device), use_cache=False).logits.float()
        mine = self.logits(hidden[:1, :k])
        scale = own.abs().max().clamp_min(1e-6)
        if not torch.allclose(mine.to(own.device), own, rtol=1e-3, atol=1e-3 * scale.item()):
            raise QmergeError(f"{type(causal_lm(self.model)).__name__} computes its logits in a way qmerge does not reproduce (softcapping or scaling it does not know); it cannot be measured")
        self.checked = True

    @contextlib.contextmanager
    def _hooked(self, on_layer: LayerCallback, captured: list[torch.Tensor]) -> Iterator[None]:
        def head_input(_module, args):
            captured.append(args[0])
            return (args[0][..., :0, :],)  # the head runs on no position: its logits come by chunks

        def layer_output(index: int):
            def hook(_module, _args, output):
                on_layer(index, output[0] if isinstance(output, tuple) else output)

            return hook

        handles = [layer.register_forward_hook(layer_output(i)) for i, layer in enumerate(self.layers[:-1])]
        handles.append(self.head.register_forward_pre_hook(head_input))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
