"""The rows of the drift report: what each candidate is, how it is built, and its size.

  merged         DIR/merged: the adapter merged into the NF4 round trip of the base (qmerge)
  original       the adapter merged into the original 16-bit base (PEFT on fp16, unsloth, LLaMA-Factory)
  peft-nf4       PEFT merge_and_unload on the 4-bit model: the sum re-rounded to NF4
  rtn            round-to-nearest of DIR/merged on the GPTQ run's grid (no calibration)
  gptq           DIR/gptq: GPTQ of DIR/merged
  gptq-original  DIR/gptq-original: GPTQ of the original-base merge (only when asked)
  base           the base without the adapter (context: how far the fine-tune moved the model)
  checkpoint     a checkpoint made elsewhere (--checkpoint NAME=DIR_OR_HUB_ID: a GPTQ or AWQ of the
                 same fine-tune, another tool's merge), shown under its NAME
  noise-floor    the reference computing in the training compute dtype (context)
Checkpoints on disk are loaded from their stage directories; the others are built in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qmerge.eval.drift import NOISE_FLOOR
from qmerge.io.dtypes import torch_dtype
from qmerge.merge.adapter import Mix
from qmerge.io.inputs import resolve
from qmerge.models.checkpoints import candidate_dtype, is_quantized, load_baseline, load_candidate
from qmerge.models.precision import describe as arithmetic
from qmerge.models.placement import Placement, as_placement
from qmerge.models.reference import peft_nf4
from qmerge.quant import rtn, sizes
from qmerge.quant.gptq_float import load_float32, stores_gptq_v1
from qmerge.settings import GPTQSettings, NF4Settings, checkpoint_kind

REFERENCES = {"qlora": "reference (QLoRA as trained)", "lora": "reference (LoRA on the 16-bit base)"}

CONTEXT = ("base", "noise-floor")
CHECKPOINT = "checkpoint:"  # kinds of the checkpoints made elsewhere: "checkpoint:NAME"
STAGE_DIRS = {"merged": "merged", "gptq": "gptq", "gptq-original": "gptq-original"}


@dataclass(frozen=True)
class Sources:
    """Everything the candidates of one run are built from."""

    out: Path  # the run directory, holding the stage outputs
    base_dir: Path
    mix: Mix  # the adapters with their weights
    nf4: NF4Settings
    gptq: GPTQSettings
    merged_dtype: str
    linears: dict[str, tuple[int, int]]  # (out, in) of every linear layer GPTQ quantizes (bits per weight are over these)
    device: torch.device | Placement  # where the candidates live (models.placement)
    trust_remote_code: bool = False
    checkpoints: tuple[str, ...] = ()  # NAME=DIR_OR_HUB_ID of the checkpoints made elsewhere
    nf4_linears: frozenset[str] = frozenset()  # the layers bitsandbytes quantized (PEFT's 4-bit merge re-rounds these)


def display_name(kind: str, gptq: GPTQSettings, merge_into: str = "nf4", searched: bool = False) -> str:
    if kind.startswith(CHECKPOINT):
        return kind.removeprefix(CHECKPOINT)
    grid = f"{gptq.bits}-bit g{gptq.group_size}"
    return {
        "merged": "merged (NF4 base + adapter)" if merge_into == "nf4" else "merged (original base + adapter)",
        "original": "merged into original 16-bit base (PEFT fp16, unsloth, LLaMA-Factory)",
        "peft-nf4": "PEFT merge_and_unload on the 4-bit model (re-rounded to NF4)",
        "rtn": f"rtn {grid}",
        "gptq": f"gptq {grid}" + (" chosen by the drift-budget search" if searched else ""),
        "gptq-original": f"gptq {grid} of the original-base merge",
        "base": "base without adapter (the fine-tune's own effect)",
        "noise-floor": NOISE_FLOOR,
    }[kind]


def path_of(kind: str, src: Sources) -> Path | None:
    if kind in STAGE_DIRS:
        return src.out / STAGE_DIRS[kind]
    if kind.startswith(CHECKPOINT):
        spec = next(spec for spec in src.checkpoints if checkpoint_kind(spec) == kind)
        return resolve(spec.partition("=")[2].strip(), f"checkpoint {display_name(kind, src.gptq)}", trust_remote_code=src.trust_remote_code)
    return src.base_dir if kind == "base" else None


def build(kind: str, src: Sources, reference: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, int] | None]:
    """The model of one candidate (not the noise floor, which is the reference itself) and the bytes
    per tensor of its checkpoint format (see qmerge.quant.sizes). `reference` is models.reference.load_reference's
    model, which "peft-nf4" copies (it is a QLoRA reference whenever that row exists)."""
    remote = src.trust_remote_code
    if kind in STAGE_DIRS or kind.startswith(CHECKPOINT):
        path = path_of(kind, src)
        return load_checkpoint(path, src.device, remote), sizes.checkpoint_layout(path)
    if kind == "base":  # no size for a pickled base (--allow-pickle)
        return load_baseline(kind, src.base_dir, src.mix, src.device, remote), sizes.checkpoint_layout(src.base_dir) or None
    linears = set(src.linears)
    merged = sizes.checkpoint_layout(src.out / "merged")  # every other tensor, stored as DIR/merged stores it
    if kind == "rtn":
        place = as_placement(src.device)
        model = rtn.apply(load_candidate(src.out / "merged", place, remote), linears, src.gptq, place.streamed)
        return model, sizes.with_linears(merged, linears, sizes.gptq_tensors(src.linears, src.gptq))
    if kind == "peft-nf4":
        model = peft_nf4(reference)  # held in 4-bit, dequantized layer by layer as it runs
        return model, sizes.with_linears(merged, src.nf4_linears, sizes.state_tensors(model, src.nf4_linears))
    model = load_baseline(kind, src.base_dir, src.mix, src.device, remote, store_dtype=src.merged_dtype)
    return model, merged  # "original": the same tensors and dtype as DIR/merged


def load_checkpoint(path: Path, where: torch.device | Placement, trust_remote_code: bool = False) -> torch.nn.Module:
    """A candidate checkpoint computing in float32: a GPTQ v1 checkpoint as the float32 weights it
    stores (every row at one precision, whatever kernel a server picks; resident), a float one upcast
    per use (resident, spread or streamed as `where` says); another quantized one made elsewhere
    through its kernels (see load_candidate)."""
    if stores_gptq_v1(path):
        return load_float32(path, as_placement(where).device, trust_remote_code)
    return load_candidate(path, where, trust_remote_code)


def compute_dtype(kind: str, src: Sources) -> str:
    """Every row computes in float32 but the noise floor (the training compute dtype) and a quantized
    checkpoint made elsewhere that qmerge cannot read as float32 weights (its kernels' dtype)."""
    if kind == "noise-floor":
        return src.nf4.compute_dtype
    path = path_of(kind, src) if kind.startswith(CHECKPOINT) else None
    if path is not None and is_quantized(path) and not stores_gptq_v1(path):
        return str(candidate_dtype(path, as_placement(src.device).device)).removeprefix("torch.")
    return "float32"


def describe(kind: str, tensors: dict[str, int] | None, src: Sources) -> dict:
    """The report's entry for one candidate, from the bytes per tensor of its format (None: no checkpoint)."""
    size, bpw = sizes.summary(tensors, src.linears) if tensors is not None else (None, None)
    path = path_of(kind, src)
    dtype = compute_dtype(kind, src)
    return {
        "kind": "checkpoint" if kind.startswith(CHECKPOINT) else kind,
        "context": kind in CONTEXT,
        "path": str(path) if path is not None else None,
        "compute_dtype": dtype,
        "arithmetic": arithmetic(torch_dtype(dtype), as_placement(src.device).device),  # "emulated": float32 with the dtype's roundings
        "size_bytes": size,
        "bits_per_weight": None if kind in CONTEXT else bpw,
    }
