"""Where a model's weights live while it runs, through accelerate's device maps (the loader
transformers itself uses), so a model need not fit the device it computes on:

- resident: every weight on `device` (the default, and the fastest);
- spread: over several GPUs by accelerate's `device_map="auto"` within `max_memory` per device;
- streamed: the decoder layers stay off the device and each module's weights are brought in as it
  runs and dropped after it (accelerate's offload hooks): "cpu" holds them in host memory (a GPU run),
  "disk" reads them from the checkpoint's own safetensors files as each runs (a CPU run: the page
  cache holds them, reclaimable, not the process's resident set). Embeddings, final norm and head
  stay resident.

A streamed or spread model computes the same function as a resident one: the same weights meet the
same inputs (tests/test_scale.py compares the logits bit for bit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from qmerge.models.taps import decoder_layers


@dataclass(frozen=True)
class Placement:
    device: torch.device  # where the model computes (a spread model: where its inputs go)
    stream: str | None = None  # "cpu" or "disk": decoder layers brought in module by module as they run
    max_memory: dict | None = None  # accelerate's max_memory for a model spread over several GPUs
    offload_dir: Path | None = None  # accelerate's offload folder (unused when the checkpoint is safetensors in the stored dtype)

    @property
    def streamed(self) -> bool:
        return self.stream is not None


def as_placement(where: torch.device | Placement) -> Placement:
    return where if isinstance(where, Placement) else Placement(torch.device(where))


def load_kwargs(where: torch.device | Placement, config, trust_remote_code: bool = False) -> dict:
    """from_pretrained's keyword arguments for `where`, the model being of `config`."""
    place = as_placement(where)
    if place.max_memory is not None:  # spread over GPUs; with "cpu" in it, accelerate streams from host memory what does not fit
        offload = {"offload_folder": str(place.offload_dir)} if place.offload_dir is not None else {}
        return {"device_map": "auto", "max_memory": place.max_memory, **offload}
    if not place.streamed:
        return {"device_map": {"": place.device}}
    offload = str(place.offload_dir or Path.home() / ".cache" / "qmerge" / "offload")
    return {"device_map": streamed_map(config, place.device, place.stream, trust_remote_code), "offload_folder": offload}


def streamed_map(config, device: torch.device, stream: str, trust_remote_code: bool = False) -> dict[str, str]:
    """accelerate device map: each decoder layer offloaded to `stream`, everything else on `device`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    names = {id(m): n for n, m in model.named_modules()}
    layers = [names[id(layer)] for layer in decoder_layers(model)]
    owners = {name.rpartition(".")[0] for name, _ in [*model.named_parameters(), *model.named_buffers()]}
    device_map = {layer: stream for layer in layers}
    for owner in sorted(owners):
        if not any(owner == layer or owner.startswith(layer + ".") for layer in layers):
            device_map[owner] = str(device)
    return device_map


def wrap_offloaded(model: torch.nn.Module, wrap) -> None:
    """Replace the weights source of every offloaded module (accelerate's weights_map, a view of one
    loader) by wrap(loader): a mapping key → tensor that may change what each module is given."""
    wrapped: dict[int, Mapping] = {}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        if weights is not None and hasattr(weights, "dataset"):
            loader = weights.dataset
            weights.dataset = wrapped.setdefault(id(loader), wrap(loader))


class Mapped(Mapping):
    """A loader whose every tensor goes through `fn(key, tensor)` first."""

    def __init__(self, loader: Mapping, fn):
        self.loader, self.fn = loader, fn

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.fn(key, self.loader[key])

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)
