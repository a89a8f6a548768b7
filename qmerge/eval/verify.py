"""`qmerge verify`: is DIR/merged really base-as-trained + adapter? Checked against a recomputation
that shares no code with qmerge's merge: transformers loads the base the way the adapter saw it
(bitsandbytes' real Linear4bit weights, dequantized, for QLoRA; the 16-bit weights for a plain
LoRA), PEFT merges the adapter with its own merge, module by module in merge_and_unload's order
(qmerge.eval.expected: one module in float32 at a time, never a float32 copy of the model, so every
LoRA variant PEFT knows is covered), and PEFT's unmerged model scores a few sequences against
DIR/merged.

Tolerances come from the merged dtype: each stored weight may differ from the exact float32 value by
its rounding (half an ulp: 2^-8 relative for bf16, 2^-11 for fp16, 2^-24 for float32) plus a tiny
absolute term for float32 arithmetic done in another order (a GPU merge against this CPU check).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qmerge.errors import VerifyError
from qmerge.eval.expected import peft_merged
from qmerge.eval.drift import evaluate
from qmerge.io.checkpoint import LazyCheckpoint
from qmerge.io.memory import release
from qmerge.io.progress import track
from qmerge.merge.adapter import Mix
from qmerge.models.checkpoints import load_candidate
from qmerge.models.placement import Placement
from qmerge.models.reference import load_reference
from qmerge.settings import NF4Settings

_HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
_ABS = 2.0**-20  # × the tensor's largest magnitude: float32 sums in another order
KLD_LIMIT = {torch.bfloat16: 1e-3, torch.float16: 1e-4, torch.float32: 1e-5}  # mean KLD vs the unmerged model
SEQUENCES, SEQ_LEN = 4, 128
_BLOCK = 1 << 20  # elements per block of rows in _compare: 4 MB float32 temporaries


@dataclass(frozen=True)
class ModuleCheck:
    key: str
    max_abs_err: float
    max_rel_err: float  # |merged − expected| / |expected| over the non-zero expected values
    of_tolerance: float  # the worst element's error over its tolerance: ≤ 1 passes


@dataclass(frozen=True)
class Verification:
    modules: list[ModuleCheck]  # worst first
    kld_mean: float
    kld_limit: float
    sequences: int
    rel_tol: float
    merged_dtype: str

    @property
    def ok(self) -> bool:
        return all(m.of_tolerance <= 1 for m in self.modules) and self.kld_mean <= self.kld_limit

    def line(self) -> str:
        """One line: the verdict, the worst module and its numbers, and the logits check."""
        w = self.modules[0]
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"verify {verdict}: worst {w.key} max abs err {w.max_abs_err:.3g}, max rel err {w.max_rel_err:.3g} "
            f"({w.of_tolerance:.3g} of the {self.merged_dtype} rounding tolerance, rel {self.rel_tol:.3g}); "
            f"mean KLD vs the unmerged model {self.kld_mean:.3g} (limit {self.kld_limit:.0e}) on {self.sequences} sequences"
        )

    def summary(self, worst: int = 5) -> dict:
        """What the report keeps: the verdict, the limits and the worst modules."""
        return {
            "ok": self.ok, "modules": len(self.modules), "merged_dtype": self.merged_dtype, "rel_tol": self.rel_tol,
            "kld_mean": self.kld_mean, "kld_limit": self.kld_limit, "sequences": self.sequences,
            "worst": [asdict(m) for m in self.modules[:worst]],
        }


def verify(merged_dir: Path, base_dir: Path, mix: Mix, nf4: NF4Settings, device: torch.device | Placement, kind: str = "qlora",
           windows: torch.Tensor | None = None, trust_remote_code: bool = False, merged_at: Placement | None = None, scratch: Path | None = None) -> Verification:
    """Compare DIR/merged with the independent recomputation, per tensor and by logits; returns the
    numbers whatever they are (raise_if_failed turns a failure into VerifyError). `merged_at`: where
    DIR/merged lives for the logits check (resident on `device` by default, or streamed)."""
    if windows is None:
        windows = _sequences(base_dir, trust_remote_code)
    reference = load_reference(base_dir, mix, nf4, device, trust_remote_code, kind)
    build = {"merged": lambda: load_candidate(merged_dir, merged_at or device, trust_remote_code)}
    kld = evaluate(reference, build, [windows], "float32", show_progress=False, cache_dir=scratch)[0]["metrics"]["merged"]["kld_mean"]
    merged = LazyCheckpoint.open(merged_dir)
    stored_keys = set(merged.keys())
    dtypes: set[torch.dtype] = set()
    modules = []
    base = reference.unload()  # the same loaded base, the adapters taken out unmerged
    for key, expected in track(peft_merged(base, mix), "verify", "tensor", total=len(stored_keys)):
        pieces = {key: expected} if key in stored_keys else _as_stored(base, key, expected)  # fused MoE experts: one tensor per expert stored
        for name, tensor in pieces.items():
            if name in stored_keys:
                stored_keys.discard(name)
                stored = merged.get(name)
                dtypes.add(stored.dtype)
                modules.append(_compare(name, stored, tensor))
    del reference, base
    release()
    modules += [_compare(key, merged.get(key), None) for key in sorted(stored_keys)]  # tensors the recomputation has not
    modules.sort(key=lambda m: -m.of_tolerance)
    coarsest = max((d for d in dtypes if d in _HALF_ULP), key=_HALF_ULP.get, default=torch.float32)
    return Verification(modules, kld, KLD_LIMIT[coarsest], len(windows), _HALF_ULP[coarsest], str(coarsest).removeprefix("torch."))


def raise_if_failed(result: Verification) -> None:
    if not result.ok:
        raise VerifyError(result.line() + "; DIR/merged is not the base as trained + the adapter: rerun the merge, and report a bug if it repeats")


def _as_stored(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A tensor keyed as the model holds it (fused MoE experts: one 3-D tensor) keyed as a checkpoint
    stores it: transformers' own reverse conversion, what save_pretrained writes. One tensor at a
    time, so a large MoE's experts never need to be held together."""
    from transformers.core_model_loading import revert_weight_conversion

    model._weight_conversions = None  # the architecture's conversions only, not the 4-bit load's (which has no reverse)
    return revert_weight_conversion(model, {key: tensor})


def _compare(key: str, stored: torch.Tensor, expected: torch.Tensor | None) -> ModuleCheck:
    """Errors of one stored tensor against its expected float32 value, and how close to the rounding
    tolerance of the stored dtype; a block of rows at a time, so the float32 temporaries stay small
    next to a 49k-row embedding."""
    if expected is None or tuple(stored.shape) != tuple(expected.shape):
        return ModuleCheck(key, float("inf"), float("inf"), float("inf"))  # a tensor the recomputation has not, or of another shape
    if stored.numel() == 0:
        return ModuleCheck(key, 0.0, 0.0, 0.0)
    stored, expected = stored.reshape(stored.shape[0], -1), expected.reshape(expected.shape[0], -1)
    low, high = torch.aminmax(expected.float())
    floor = _ABS * max(-low.item(), high.item(), torch.finfo(torch.float32).tiny)
    rows = max(1, _BLOCK // stored.shape[1])
    worst_abs = worst_rel = worst_of = 0.0
    for start in range(0, stored.shape[0], rows):
        e = expected[start : start + rows].to("cpu", torch.float32)
        err = (stored[start : start + rows].float() - e).abs()  # exact for the near-equal values that matter (Sterbenz)
        if not torch.isfinite(err).all():
            return ModuleCheck(key, float("inf"), float("inf"), float("inf"))
        magnitude = e.abs()
        tolerance = _HALF_ULP.get(stored.dtype, 0.0) * magnitude + floor
        nonzero = e != 0
        worst_abs = max(worst_abs, err.max().item())
        worst_of = max(worst_of, (err / tolerance).max().item())
        if nonzero.any():
            worst_rel = max(worst_rel, (err[nonzero] / magnitude[nonzero]).max().item())
    return ModuleCheck(key, worst_abs, worst_rel, worst_of)


def _sequences(base_dir: Path, trust_remote_code: bool) -> torch.Tensor:
    """A few eval windows of the built-in text (the stdlib preset), tokenized by the base's tokenizer."""
    from transformers import AutoTokenizer

    from qmerge.io import text

    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    return text.windows("stdlib", "eval", tokenizer, SEQ_LEN, SEQUENCES)
