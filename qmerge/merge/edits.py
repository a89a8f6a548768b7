"""What the merge writes for each base tensor: the edits of a mix of weighted adapters applied to the
weights as trained, with the tie between input and output embeddings kept while both stay equal.

A tied lm_head is the embedding's tensor, so its edits (LoRA on lm_head, rows of a trainable-token
adapter PEFT ties to the embedding's) start from the embedding as trained. When the edited embedding
and lm_head differ, lm_head.weight is written as a tensor of its own and the tie is broken (the merged
config gets tie_word_embeddings false, and MergeResult records it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import AutoModelForCausalLM

from qmerge.io.memory import trim
from qmerge.merge.adapter import Adapter, Mix, check_fits
from qmerge.merge.source import Source
from qmerge.errors import QmergeError
from qmerge.merge.lora import F32, Edit, Replace, TokenRows


@dataclass(frozen=True)
class Tie:
    input_key: str  # e.g. model.embed_tokens.weight
    output_key: str  # e.g. lm_head.weight


def tie_of(model: torch.nn.Module) -> Tie | None:
    """The input/output embedding pair sharing one tensor in `model` (a meta model is enough)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is not inp.weight:
        return None
    names = {id(m): name for name, m in model.named_modules()}
    return Tie(f"{names[id(inp)]}.weight", f"{names[id(out)]}.weight")


class Edits:
    """The merge's `edits.apply(key, tensor, device)` seam, plus the tensors a broken tie adds."""

    def __init__(self, mix: Mix, tie: Tie | None):
        self.mix, self.tie = mix, tie
        self.untied = False
        self._extra: dict[str, torch.Tensor] = {}
        self._seen: set[str] = set()

    def keys(self) -> set[str]:
        """The base tensors to hand to apply(): a tied lm_head's edits come through its embedding."""
        keys = {key for part in self.mix for key in part.adapter.edits}
        if self.tie is not None and self.tie.output_key in keys:
            keys = keys - {self.tie.output_key} | {self.tie.input_key}
        return keys

    def count(self, kind: type) -> int:
        """Base tensors that receive an edit of this kind (e.g. LoraDelta: the LoRA modules)."""
        keys = {key for part in self.mix for key, edits in part.adapter.edits.items() if any(isinstance(e, kind) for e in edits)}
        return len(keys)

    def apply(self, key: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The tensor to write for `key`, given the weight as trained; `tensor` itself when unedited."""
        self._seen.add(key)
        edited = self._edit(key, tensor, device)
        if self.tie is not None and key == self.tie.input_key:
            head = self._edit(self.tie.output_key, tensor, device)
            if head is not edited and not torch.equal(head, edited):
                self._extra[self.tie.output_key] = head.cpu()
                self.untied = True
        return edited

    def extra_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Tensors the base checkpoint does not store but the merge must write (a lm_head untied)."""
        return [(key, tensor) for key, tensor in self._extra.items() if key not in self._seen]

    def _edit(self, key: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        edits = self._edits_of(key)
        if not edits:
            return tensor
        w = tensor.to(device, F32)
        for edit, weight in edits:
            w = edit.apply(w, weight, device)
        return w

    def _edits_of(self, key: str) -> list[tuple[Edit, float]]:
        """A key's edits with their adapter's weight; a tied lm_head without token rows of its own shares
        the embedding's (PEFT ties the output embedding's token adapter to the input's)."""
        own = [(edit, part.weight) for part in self.mix for edit in part.adapter.edits.get(key, ())]
        if self.tie is not None and key == self.tie.output_key and not any(isinstance(e, TokenRows) for e, _ in own):
            own += [(e, w) for e, w in self._edits_of(self.tie.input_key) if isinstance(e, TokenRows)]
        return own


def build_edits(mix: Mix, config, base: Source, trust_remote_code: bool = False) -> Edits:
    """Edits for a merge into `base` (its tensors as the adapter saw them: qmerge.merge.source.as_trained), validated first: every adapter fits the base, and only adapters
    that add deltas are weighted or mixed (DoRA's norm, replaced tensors and token rows are not linear).
    The returned Edits' mix is the one to merge and to build baselines from (saved copies of base
    tensors dropped)."""
    with torch.device("meta"):
        tie = tie_of(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code))
    aliases = {tie.output_key: tie.input_key} if tie is not None and tie.output_key not in base.keys() else {}
    mix = tuple(replace(part, adapter=_without_copies(part.adapter, base, aliases)) for part in mix)
    for part in mix:
        adapter = part.adapter
        check_fits(adapter, base, aliases)
        if (len(mix) > 1 or part.weight != 1) and not adapter.linear:
            raise QmergeError(
                f"{adapter.directory} uses DoRA, modules_to_save or trainable tokens, which are not a linear "
                "combination of deltas; merge it alone with weight 1"
            )
        if tie is not None and adapter.config.get("ensure_weight_tying") and {tie.input_key, tie.output_key} & set(adapter.edits):
            raise QmergeError(f"{adapter.directory}: ensure_weight_tying on tied embeddings is not supported by this qmerge release; train without it or merge with PEFT")
    return Edits(mix, tie)


def _without_copies(adapter: Adapter, base: Source, aliases: dict[str, str]) -> Adapter:
    """PEFT saves an embedding layer it puts LoRA on whole (`base_layer.weight`), in case the vocabulary
    was resized; a copy equal to the base's tensor changes nothing, and dropping it lets such adapters
    be weighted and mixed."""
    keys = set(base.keys())

    def copy_of_base(key: str, edit: Edit) -> bool:
        stored = aliases.get(key, key)
        return (
            isinstance(edit, Replace) and stored in keys and edit.misfit(base.shape(stored)) is None
            and torch.equal(edit.tensor.float(), base.get(stored).float())
        )

    edits = {key: tuple(e for e in es if not copy_of_base(key, e)) for key, es in adapter.edits.items()}
    return replace(adapter, edits={key: es for key, es in edits.items() if es})


@torch.no_grad()
def apply_to_model(model: torch.nn.Module, mix: Mix, device: torch.device, dtype: torch.dtype | None = None) -> Edits:
    """The mix merged into a loaded model's own weights (the "merged into original" baseline), with
    the same edits and tie rule as a merge into the NF4 base; each edited tensor computed in float32
    and, with `dtype`, rounded to it at once, so no float32 copy of the model ever exists. Weights not
    loaded (on the meta device: a streamed model's) are left to the caller, with the Edits returned."""
    edits = Edits(mix, tie_of(model))

    def stored(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, dtype) if dtype is not None and tensor.is_floating_point() else tensor.to(device)

    for i, key in enumerate(sorted(edits.keys())):
        param = model.get_parameter(key)
        if not param.is_meta:
            param.data = stored(edits.apply(key, param.data, device))
        if i % 16 == 15:
            trim()  # each tensor's float32 temporaries, before they fragment the heap
    for key, tensor in edits.extra_tensors():
        model.get_submodule(key.rpartition(".")[0]).weight = torch.nn.Parameter(stored(tensor), requires_grad=False)
        model.config.tie_word_embeddings = False
    return edits
