"""Everything a run checks before its first heavy stage, so that bad input fails in seconds and
leaves nothing behind: settings, output directory, inputs, adapter against base, shapes against the
GPTQ grid and the target server, and the calibration and eval text cut into token windows."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from qmerge.errors import QmergeError
from qmerge.io import text
from qmerge.io.inputs import hub_origin, load_base_config, resolve, tree_sha256
from qmerge.io.manifests import key_of
from qmerge.merge.adapter import Mix, load_mix, parse_spec
from qmerge.merge.edits import build_edits
from qmerge.merge.nf4 import quantized_linear_names
from qmerge.merge.prequantized import Prequantized
from qmerge.merge.source import as_trained, effective_settings
from qmerge.models.architecture import converted_at_load
from qmerge.models.checkpoints import check_loadable
from qmerge.models.device import pick_device
from qmerge.quant import structure
from qmerge.quant.gptq import gptq_loader
from qmerge.quant.servers import check_target, resolve_group_size
from qmerge.settings import DataSettings, GPTQSettings, NF4Settings, RunSettings


@dataclass(frozen=True)
class EvalSet:
    """One eval source cut into windows."""

    name: str  # the source as given (preset name or path)
    windows: torch.Tensor
    scored_bytes: int  # UTF-8 bytes of the scored text
    overlap: float  # fraction of its windows also in the calibration set (0 unless --allow-overlap)


@dataclass(frozen=True)
class Prepared:
    """The run's inputs, validated and resolved."""

    base_dir: Path
    mix: Mix  # the adapters with their weights
    device: torch.device
    calibration: torch.Tensor
    evaluations: tuple[EvalSet, ...]
    linears: dict[str, tuple[int, int]]  # (out, in) of every linear layer GPTQ quantizes, as the checkpoint names it
    nf4: NF4Settings  # the run's 4-bit settings: the user's, or a pre-quantized base's own
    prequantized: bool  # the base is a bitsandbytes 4-bit checkpoint (no 16-bit weights)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    bos: bool = False  # every window starts with the tokenizer's BOS token (qmerge.io.text.token_windows)
    nf4_linears: frozenset[str] = frozenset()  # the linear layers bitsandbytes quantized (module names)
    plan: GPTQPlan | None = None  # the GPTQ settings resolved for this model (group size auto)
    fused_experts: bool = False  # transformers holds some tensors under other names (fused MoE experts): no DIR/nf4 (its 4-bit reload does not map them)

    @property
    def in_features(self) -> set[int]:
        return {shape[1] for shape in self.linears.values()}


@dataclass(frozen=True)
class GPTQPlan:
    """GPTQ for this model, decided before any work: the group size (auto resolved), the loader a
    user would load the checkpoint with, and the line saying what auto chose."""

    gptq: GPTQSettings
    loader: str = "transformers"  # or "gptqmodel" (fused MoE experts: transformers has no place for them)
    note: str | None = None


def gptq_plan(settings: RunSettings, config, source, nf4_names: set[str]) -> tuple[dict[str, tuple[int, int]], GPTQPlan]:
    """The layers GPTQ quantizes (GPTQModel's definition; with --skip-gptq on an architecture it does
    not know, those bitsandbytes quantized, for bits per weight) and the resolved GPTQ plan."""
    shapes = {k: tuple(source.shape(k)) for k in source.keys()}
    try:
        layers = structure.gptq_layers(config, shapes)
    except QmergeError:
        if not settings.skip_gptq:
            raise
        return {n: shapes[f"{n}.weight"] for n in nf4_names}, GPTQPlan(settings.gptq)
    if settings.skip_gptq:
        return layers.shapes, GPTQPlan(settings.gptq)
    if settings.search and layers.fused:
        raise QmergeError(f"--search cannot set a precision per module on a model with fused layers ({next(iter(layers.fused))}): run without --search")
    gptq, note = resolve_group_size(layers.shapes, settings.gptq)
    loader = gptq_loader(config, layers, settings.trust_remote_code)
    check_target(gptq, {shape[1] for shape in layers.shapes.values()}, loader)
    return layers.shapes, GPTQPlan(gptq, loader, note)


def check_out(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Nothing a user has is replaced without --overwrite (or continued without --resume)."""
    if out.exists() and not out.is_dir():
        raise QmergeError(f"output path {out} is a file; choose a directory for --out")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise QmergeError(f"output directory {out} exists and is not empty; choose another --out, pass --overwrite, or --resume a run")


def prepare(settings: RunSettings, data: bool = True) -> Prepared:
    """Fail in seconds on anything that would fail later: settings, inputs, shapes, group size, data
    (data=False: no token windows, and no tokenizer needed: a merge that is not verified)."""
    settings.validate()
    check_out(Path(settings.out), settings.overwrite, settings.resume)
    device = pick_device(settings.device)
    remote = settings.trust_remote_code
    base_dir = resolve(settings.base, "base", settings.revision, remote)
    config = load_base_config(base_dir, remote)
    mix = load_mix(settings.adapter, settings.allow_pickle)
    source = as_trained(base_dir, config, settings.nf4, settings.merge_into, settings.allow_pickle, remote)
    nf4 = effective_settings(config, source, settings.nf4, settings.nf4_given)
    mix = build_edits(mix, config, source, remote).mix
    nf4_names = quantized_linear_names(config, nf4, remote)
    shapes, plan = gptq_plan(settings, config, source, nf4_names)
    for part in mix:
        check_vocabulary(part.adapter.directory, config, remote)
        warn_if_other_base(part.adapter, settings.base, base_dir)
    for kind, spec in zip(settings.checkpoint_kinds, settings.checkpoints):  # made elsewhere: fetched and checked now
        name = kind.removeprefix("checkpoint:")
        check_loadable(resolve(spec.partition("=")[2].strip(), f"checkpoint {name}", trust_remote_code=remote), name)
    calibration, evaluations, bos = torch.empty(0, dtype=torch.long), (), False
    if data:
        tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=remote)
        calibration, evaluations = token_windows(settings.data, tokenizer)
        bos = text.bos_of(tokenizer) is not None
    return Prepared(
        base_dir, mix, device, calibration, evaluations, shapes, nf4, isinstance(source, Prequantized), remote, settings.allow_pickle,
        bos, frozenset(nf4_names), plan, converted_at_load(config, source.keys(), remote),
    )


def token_windows(d: DataSettings, tokenizer) -> tuple[torch.Tensor, tuple[EvalSet, ...]]:
    """The calibration windows and each eval set's, the eval sets checked disjoint from calibration."""
    calibration = text.windows(d.calibration, "calibration", tokenizer, d.seq_len, d.calibration_samples)
    evaluations = []
    for name in d.eval:
        windows = text.windows(name, "eval", tokenizer, d.seq_len, d.eval_samples)
        overlap = text.check_disjoint(calibration, windows, name, allow=d.allow_overlap)
        evaluations.append(EvalSet(name, windows, text.scored_bytes(windows, tokenizer), overlap))
    return calibration, tuple(evaluations)


def effective(settings: RunSettings, p: Prepared) -> RunSettings:
    """The settings the run really uses: a pre-quantized base's own 4-bit settings, and no rows that
    cannot be built or would repeat another: a pre-quantized base has no 16-bit weights ("original",
    "gptq-original"); with --merge-into original the merged candidate is that merge itself, and there
    is no 4-bit model for PEFT's 4-bit merge."""
    drop = set()
    if p.prequantized or settings.merge_into == "original":
        drop |= {"original", "gptq-original"}
    if settings.merge_into == "original":
        drop.add("peft-nf4")
    gptq = p.plan.gptq if p.plan is not None else settings.gptq
    return replace(settings, nf4=p.nf4, gptq=gptq, candidates=tuple(k for k in settings.candidates if k not in drop))


def check_vocabulary(adapter_dir: Path, config, trust_remote_code: bool) -> None:
    """An adapter saved with its own, larger tokenizer was trained on resized embeddings qmerge does not have."""
    if not any((adapter_dir / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return
    size = len(AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code))
    if size > config.vocab_size:
        raise QmergeError(
            f"the adapter's tokenizer has {size} tokens but the base's vocabulary is {config.vocab_size}; "
            "the adapter was trained with resized embeddings: merge it with the resized base"
        )


def warn_if_other_base(adapter, base_spec: str, base_dir: Path) -> None:
    """A warning only: paths move, so a differing base_model_name_or_path is no proof of a mismatch."""
    named = adapter.base_model_name
    if named and Path(named).name not in (Path(base_spec).name, base_dir.name) and named != base_spec:
        print(f"qmerge: warning: the adapter names base {named!r}, not {base_spec!r}; continuing (shapes fit)", file=sys.stderr)


def inputs_record(settings: RunSettings, p: Prepared) -> dict:
    """report.json's `inputs`: what the run read, with the hashes that identify it (stage keys use them)."""
    base = {
        "spec": settings.base, "path": str(p.base_dir), "from_hub": not Path(settings.base).expanduser().exists(), "sha256": tree_sha256(p.base_dir, settings.verify_inputs),
        "prequantized": p.prequantized, **hub_origin(settings.base, p.base_dir, settings.revision),
    }
    return {
        "base": base, "adapter": adapter_record(settings.adapter, p.mix, settings.verify_inputs),
        "calibration_windows": len(p.calibration), "eval_windows": len(p.evaluations[0].windows) if p.evaluations else 0, "windows_start_with_bos": p.bos,
    }


def adapter_record(specs: tuple[str, ...], mix: Mix, verify: bool = False) -> dict:
    """The adapter inputs for the report and stage keys: one adapter as {spec, path, sha256}; a mix as
    the same keys over all of it (sha256 of the parts' hashes and weights) plus each part."""
    parts = [
        {"spec": spec, "path": str(part.adapter.directory), "weight": part.weight, "sha256": tree_sha256(part.adapter.directory, verify),
         **hub_origin(parse_spec(spec)[0], part.adapter.directory)}
        for spec, part in zip(specs, mix)
    ]
    if len(parts) == 1 and parts[0]["weight"] == 1:
        return {key: value for key, value in parts[0].items() if key != "weight"}
    return {
        "spec": " + ".join(specs),
        "path": " + ".join(f"{part['path']}:{part['weight']:g}" for part in parts),
        "sha256": key_of(adapters=[(part["sha256"], part["weight"]) for part in parts]),
        "parts": parts,
    }
