"""The stages of `qmerge run` one at a time (`qmerge merge`, `qmerge quantize`, `qmerge eval`, and the
API's merge_adapter, gptq_quantize, evaluate), so that a merge made on one machine is quantized or
evaluated on another, or a checkpoint made elsewhere is evaluated against the model as trained.

Each is the run's own stage, declared by qmerge.pipeline with the same key parts and committed the
same way: the output appears whole (built in a hidden sibling) with its manifest in
ROOT/manifests/NAME.json beside it, ROOT being the output's parent. Stage outputs laid out as a run
lays them out (DIR/merged, DIR/gptq) therefore carry a run's manifests, and `qmerge run --resume`
reuses them. Settings are the run's (recipe keys, validated by the same code), so defaults and
errors are the run's too.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import fields, replace
from pathlib import Path

import torch

from qmerge import recipe
from qmerge.errors import QmergeError
from qmerge.io import text
from qmerge.io.checkpoint import LazyCheckpoint
from qmerge.io.inputs import load_base_config
from qmerge.io.manifests import MANIFESTS, files_record, key_of
from qmerge.merge.source import as_trained, effective_settings
from qmerge.models.device import pick_device
from qmerge.outputs import report_of, write_outputs
from qmerge.pipeline import calibration_key, common_parts, declare, gptq_stage, in_process, scratch_dir
from qmerge.plan import make as memory_plan
from qmerge.runner import StageRunner
from qmerge.prepare import Prepared, check_out, effective, gptq_plan, inputs_record, prepare
from qmerge.quant.gptq import read_quant_log
from qmerge.settings import GPTQSettings, NF4Settings, RunSettings

_SECTION = {key: section for key, (section, _) in recipe.KEYS.items()}
NF4_KEYS = tuple(k for k, s in _SECTION.items() if s == "nf4")
MERGE_KEYS = (*NF4_KEYS, "merge_into", "merged_dtype", "device", "allow_pickle", "trust_remote_code", "revision")
QUANTIZE_KEYS = (*(k for k, s in _SECTION.items() if s == "gptq"), "calibration", "calibration_samples", "seq_len", "device", "seed", "trust_remote_code")
VERIFY_KEYS = (*NF4_KEYS, "merge_into", "device", "trust_remote_code", "revision")
EVAL_KEYS = tuple(k for k in recipe.KEYS if k not in ("base", "adapter", "out", "search"))  # eval scores DIR/gptq as it is: no search
UNUSED = "-"  # base and adapter of a stage that reads neither (quantize): RunSettings requires both


def settings_of(stage: str, allowed: tuple[str, ...], values: dict, overwrite: bool = False, resume: bool = False) -> RunSettings:
    """The run's settings from `values` (recipe keys), refusing a key `stage` does not take."""
    unknown = sorted(k for k, v in values.items() if k not in allowed and k not in ("base", "adapter", "out") and v is not None)
    if unknown:
        raise QmergeError(f"unknown setting {unknown[0]!r} for {stage}; its settings are {', '.join(sorted(allowed))}")
    return recipe.to_settings(values, overwrite=overwrite, resume=resume)


def only(values: dict, allowed: tuple[str, ...]) -> dict:
    """The values a stage takes, from a recipe written for a whole run."""
    return {k: v for k, v in values.items() if k in allowed or k in ("base", "adapter", "out")}


def base_settings(base_dir: Path, settings: RunSettings) -> NF4Settings:
    """The 4-bit settings the adapter saw: the given ones, or a pre-quantized base's own (which
    refuses a given setting that disagrees with it)."""
    config = load_base_config(base_dir, settings.trust_remote_code)
    source = as_trained(base_dir, config, settings.nf4, settings.merge_into, trust_remote_code=settings.trust_remote_code)
    return effective_settings(config, source, settings.nf4, settings.nf4_given)


def merge(base: str, adapter, out: Path, values: dict, overwrite: bool, resume: bool, verify: bool, echo: bool) -> Path:
    """The run's merge stage into `out` (verified against PEFT unless verify=False)."""
    out = Path(out).resolve()
    settings = settings_of("merge", MERGE_KEYS, {**values, "base": base, "adapter": adapter, "out": str(out.parent)}, overwrite)
    settings = replace(settings, skip_gptq=True, resume=True)  # no GPTQ grid to check; resume: ROOT may hold other stages
    check_out(out, overwrite, resume)
    p = prepare(settings, data=verify)
    settings = effective(settings, p)
    plan = memory_plan(settings, p, out.parent, forked_workers=False)  # where verify's candidate lives; the whole run's fit is run's check
    declared = declare(settings, p, out.parent, inputs_record(settings, p), False, echo, plan, check_merge=verify)
    stages = [replace(s, name=out.name) if s.name == "merged" else s for s in declared if s.name in ("nf4", "merged")]  # DIR/nf4 first when the merge reads it
    runner = StageRunner(out.parent, resume, echo, in_process(stages, p.device), verify=settings.verify_inputs)
    with _removed_on_error(out.parent), _scratch(out.parent):
        for stage in stages:
            runner.run(stage)
    return out


def quantize(merged: Path, out: Path, values: dict, overwrite: bool, resume: bool, verbose: bool, echo: bool) -> tuple[Path, list[dict]]:
    """The run's GPTQ stage of the checkpoint `merged` into `out`; needs neither base nor adapter."""
    merged, out = Path(merged).resolve(), Path(out).resolve()
    settings = settings_of("quantize", QUANTIZE_KEYS, {**values, "base": UNUSED, "adapter": UNUSED, "out": str(out.parent)}, overwrite)
    settings.validate()
    remote = settings.trust_remote_code
    if not (merged / "config.json").is_file():
        raise QmergeError(f"{merged} is not a checkpoint (no config.json); pass DIR/merged (qmerge merge writes it)")
    config = load_base_config(merged, remote)  # refuses an already quantized checkpoint by its method
    if hasattr(config, "quantization_config"):
        raise QmergeError(f"{merged} is a bitsandbytes 4-bit checkpoint; quantize the merged 16-bit checkpoint (DIR/merged)")
    check_out(out, overwrite, resume)
    shapes, plan = gptq_plan(settings, config, LazyCheckpoint.open(merged), set())  # the layers GPTQModel quantizes; group size auto resolved
    settings = replace(settings, gptq=plan.gptq)
    if echo and plan.note:
        print(f"[qmerge] {plan.note}", flush=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged, trust_remote_code=remote)
    calibration = text.windows(settings.data.calibration, "calibration", tokenizer, settings.data.seq_len, settings.data.calibration_samples)
    upstream, manifest = _stage_key(merged)
    settings = replace(settings, nf4=NF4Settings(**manifest["produced_by"]["nf4"]) if manifest else NF4Settings())
    device = pick_device(settings.device)
    p = Prepared(merged, (), device, calibration, (), shapes, settings.nf4, False, remote, plan=plan)
    stage = gptq_stage(out.name, merged.name, p, merged.parent, settings, calibration_key(calibration), common_parts(settings, device), verbose)
    runner = StageRunner(out.parent, resume, echo, in_process([stage], device))
    runner.keys[merged.name] = upstream
    torch.manual_seed(settings.seed)
    with _removed_on_error(out.parent):
        runner.run(stage)
    return out, read_quant_log(out)


def evaluate(base: str, adapter, out: Path, values: dict, overwrite: bool, resume: bool, verbose: bool, echo: bool) -> tuple[Path, dict]:
    """The run's drift stage and report in `out`: its merged/ and gptq/ (those present) and every
    --checkpoint scored against the model as trained; out/drift and out/report.* are written."""
    out = Path(out).resolve()
    asked = settings_of("eval", EVAL_KEYS, {**values, "base": base, "adapter": adapter, "out": str(out)}, overwrite)
    settings = eval_settings(asked, out, given=values)
    if (out / "drift").exists() and not (overwrite or resume):
        raise QmergeError(f"{out / 'drift'} exists; pass --overwrite to measure again or --resume to reuse it")
    p = prepare(replace(settings, resume=True))  # resume: out holds the stages it reads
    settings = effective(settings, p)
    inputs = inputs_record(settings, p)
    plan = memory_plan(settings, p, out, forked_workers=False)  # the reference cache's place and the eval batch
    stages = declare(settings, p, out, inputs, verbose, echo, plan)
    runner = StageRunner(out, resume, echo, in_process(stages, p.device), verify=settings.verify_inputs)
    with _removed_on_error(out), _scratch(out):
        for stage in stages[:-1]:  # the stages the drift stage reads, as they are in out
            if stage.name == "nf4":  # the base as trained, which the reference loads: made here when out lacks it
                replace(runner, resume=True).run(stage)  # shares the runner's keys and records
                continue
            runner.keys[stage.name], manifest = _stage_key(out / stage.name)
            runner.infos[stage.name] = manifest.get("info", {}) if manifest else {}
        runner.run(stages[-1])
    report = report_of(settings, p, out, inputs, runner, plan)
    write_outputs(report, settings, out, echo)
    return out, report


NEEDS = {"merged": "merged", "rtn": "merged", "gptq": "gptq", "gptq-original": "gptq-original"}  # candidate kind -> stage output it reads
GRID = {"bits": "bits", "group_size": "group_size", "act_order": "desc_act", "sym": "sym"}  # recipe key -> quantize_config.json field


def eval_settings(asked: RunSettings, out: Path, given: dict) -> RunSettings:
    """The run's settings for what `out` holds: the candidates whose stage output exists there (or
    those named, each of which must), the GPTQ grid read from out/gptq, and every --checkpoint."""
    present = {name for name in set(NEEDS.values()) if (out / name / "config.json").is_file()}
    missing = [kind for kind in asked.candidates if kind in NEEDS and NEEDS[kind] not in present]
    if given.get("candidates") is not None and missing:
        raise QmergeError(f"--candidates {missing[0]} reads {out / NEEDS[missing[0]]}, which does not exist; make it with qmerge merge / quantize, or leave {missing[0]} out")
    if not present and not asked.checkpoints:
        raise QmergeError(f"{out} holds no merged/ or gptq/ checkpoint and no --checkpoint was given; run qmerge merge (and quantize) with --out {out}, or pass --checkpoint NAME=DIR")
    grid = _grid(out / "gptq", asked.gptq, given) if "gptq" in present else asked.gptq
    candidates = tuple(kind for kind in asked.candidates if kind not in missing)
    return replace(asked, candidates=candidates, gptq=grid, skip_gptq=asked.skip_gptq or "gptq" not in present)


def _grid(gptq_dir: Path, gptq: GPTQSettings, given: dict) -> GPTQSettings:
    """The grid out/gptq was quantized on (the rtn row and the display names use it); a flag that
    says otherwise is refused by name."""
    stored = json.loads((gptq_dir / "config.json").read_text()).get("quantization_config", {})
    values = {field: stored[field] for field in GRID.values() if field in stored}
    for key, field in GRID.items():
        if given.get(key) is not None and field in values and given[key] != values[field]:
            raise QmergeError(f"{gptq_dir} was quantized with {field}={values[field]}, not --{key.replace('_', '-')} {given[key]}; leave the flag out (it is read from the checkpoint)")
    return replace(gptq, **{k: v for k, v in values.items() if k in {f.name for f in fields(GPTQSettings)}})


def _stage_key(directory: Path) -> tuple[str, dict | None]:
    """The key a stage output was committed with (its manifest beside it), or, for a checkpoint
    made elsewhere, one over its files; and the manifest (None without one)."""
    try:
        manifest = json.loads((directory.parent / MANIFESTS / f"{directory.name}.json").read_text())
        return manifest["key"], manifest
    except (OSError, ValueError, KeyError):
        return (key_of(files={k: v["sha256"] for k, v in files_record(directory).items()}) if directory.is_dir() else "absent"), None


@contextlib.contextmanager
def _scratch(root: Path):
    """The run's scratch directory (offloaded layers, the on-disk reference cache) removed at the end."""
    try:
        yield
    finally:
        shutil.rmtree(scratch_dir(root), ignore_errors=True)


@contextlib.contextmanager
def _removed_on_error(root: Path):
    """A root this call creates is removed again when its stage fails: nothing is left behind."""
    created = not root.exists()
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(root, ignore_errors=True)
        raise
