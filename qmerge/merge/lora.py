"""What a PEFT LoRA adapter does to one base tensor, written as PEFT's unmerged forward computes it.

Each edit maps the weight as trained (the float32 NF4 values of a quantized linear, the stored tensor
otherwise) to the weight whose plain forward equals PEFT's forward with the adapter unmerged. They
run in float32 and apply in the order `Replace`, `LoraDelta`, `LoraBias`, `TokenRows`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F32 = torch.float32


@dataclass(frozen=True)
class Replace:
    """modules_to_save (and the base tensors PEFT saves with an adapter): the saved tensor is the layer's."""

    tensor: torch.Tensor

    def apply(self, w: torch.Tensor, weight: float, device: torch.device) -> torch.Tensor:
        return self.tensor.to(device, F32)

    def misfit(self, shape: tuple[int, ...]) -> str | None:
        return _unless(tuple(self.tensor.shape), shape)


@dataclass(frozen=True)
class LoraDelta:
    """W + weight·scale·B·A; with DoRA, (m / ‖W + scale·B·A‖ per output row) ⊙ (W + scale·B·A).

    An embedding's factors are stored the other way round (lora_embedding_A is r × vocab, B is dim × r)
    and PEFT looks the token up in Aᵀ then multiplies by Bᵀ, so its delta is (B·A)ᵀ. DoRA's norm is
    taken on W + scale·B·A with W the weight as trained, the dequantized NF4 weight under QLoRA (PEFT's
    `dequantize_module_weight`), and the bias passes through unchanged."""

    a: torch.Tensor  # r × in (embedding: r × num_embeddings)
    b: torch.Tensor  # out × r (embedding: embedding_dim × r)
    scale: float
    embedding: bool = False
    magnitude: torch.Tensor | None = None  # DoRA's lora_magnitude_vector, one entry per output row

    def delta(self, device: torch.device) -> torch.Tensor:
        """scale·B·A in float32 (the adapter trains in float32), oriented like the base weight."""
        d = (self.b.to(device, F32) @ self.a.to(device, F32)) * self.scale
        return d.T if self.embedding else d

    def apply(self, w: torch.Tensor, weight: float, device: torch.device) -> torch.Tensor:
        if self.magnitude is None:
            return w + weight * self.delta(device)
        v = w + self.delta(device)  # DoRA is merged alone with weight 1 (qmerge.merge.edits refuses the rest)
        return (self.magnitude.to(device, F32) / torch.linalg.norm(v, dim=1)).unsqueeze(1) * v

    def misfit(self, shape: tuple[int, ...]) -> str | None:
        out_in = (self.b.shape[0], self.a.shape[1])
        return _unless(out_in[::-1] if self.embedding else out_in, shape)


@dataclass(frozen=True)
class LoraBias:
    """lora_bias: lora_B's bias is inside the LoRA branch, so PEFT's forward multiplies it by scale.
    (PEFT's float merge scales it too; its bitsandbytes 4-bit merge adds it unscaled, which disagrees
    with its own forward whenever scale != 1.)"""

    bias: torch.Tensor
    scale: float

    def apply(self, w: torch.Tensor, weight: float, device: torch.device) -> torch.Tensor:
        return w + weight * self.scale * self.bias.to(device, F32)

    def misfit(self, shape: tuple[int, ...]) -> str | None:
        return _unless(tuple(self.bias.shape), shape)


@dataclass(frozen=True)
class TokenRows:
    """trainable_token_indices: the saved rows replace the layer's rows at those token ids."""

    indices: tuple[int, ...]
    rows: torch.Tensor  # len(indices) × embedding_dim

    def apply(self, w: torch.Tensor, weight: float, device: torch.device) -> torch.Tensor:
        index = torch.tensor(self.indices, device=device)
        return w.index_copy(0, index, self.rows.to(device, F32))

    def misfit(self, shape: tuple[int, ...]) -> str | None:
        if len(shape) == 2 and self.rows.shape[1] == shape[1] and max(self.indices) < shape[0]:
            return None
        return f"rows up to token {max(self.indices)} of width {self.rows.shape[1]}"


def _unless(implied: tuple[int, ...], shape: tuple[int, ...]) -> str | None:
    """The shape an edit implies, as text, when the base tensor's differs."""
    return None if implied == tuple(shape) else "x".join(map(str, implied))


Edit = Replace | LoraDelta | LoraBias | TokenRows
ORDER = (Replace, LoraDelta, LoraBias, TokenRows)
