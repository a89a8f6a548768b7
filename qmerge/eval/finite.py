"""Non-finite logits are an error, never a number: a NaN or an infinity in any model's logits would
make every metric of its row NaN (and report.json invalid JSON), so the first one stops the run with
a line naming the model and what to do."""

from __future__ import annotations

import torch

from qmerge.errors import QmergeError


def check_finite(logits: torch.Tensor, model: str, window: int) -> None:
    """Refuse `logits` of `model` on eval window `window` (counted from 0) that hold NaN or Inf."""
    if not torch.isfinite(logits).all():
        raise QmergeError(
            f"{model} computes non-finite logits (NaN or Inf) on window {window}: a layer overflows even in float32; "
            "check the base and adapter for huge or non-finite weights (a model that overflows cannot be measured or served)"
        )
