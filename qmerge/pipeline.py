"""`qmerge run`: inputs → NF4 base → merge → GPTQ → drift → report, as a list of declared stages.

Everything that can be checked is checked first (qmerge.prepare), before DIR is created, so bad
input leaves nothing behind. Each stage is then committed atomically with a manifest
(qmerge.io.manifests): a crash loses no finished stage, --resume reuses the verified ones, and an
existing DIR is touched only with --overwrite or --resume.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from qmerge.eval import candidates, samples, search
from qmerge.eval.drift import evaluate
from qmerge.eval.verify import SEQ_LEN, SEQUENCES, raise_if_failed, verify
from qmerge.io import text
from qmerge.io.atomic import PARTIAL
from qmerge.io.manifests import MANIFESTS, StageCommitter, key_of
from qmerge.io.memory import release
from qmerge.merge.nf4base import write_nf4_base
from qmerge.merge.streaming import merge
from qmerge.models.placement import Placement
from qmerge.models.precision import describe
from qmerge.models.reference import load_reference
from qmerge.plan import Plan
from qmerge.plan import make as memory_plan
from qmerge.outputs import report_of, write_outputs
from qmerge.prepare import EvalSet, Prepared, effective, inputs_record, prepare
from qmerge.quant.gptq import quantize
from qmerge.report import files
from qmerge.report.schema import library_versions
from qmerge.runner import Stage, StageRunner, worker_method
from qmerge.settings import VERSION, NF4Settings, RunSettings, reference_kind


RUN_PID = os.getpid()  # of the process that imported qmerge: the run's, in its forked workers too


@dataclass(frozen=True)
class StageJob:
    """One stage's build, as a worker process runs it: the stages are declared again from the run's
    picklable context and the named one is built (a spawned worker gets this object pickled)."""

    settings: RunSettings
    p: Prepared
    out: Path
    inputs: dict
    verbose: bool
    echo: bool
    plan: Plan
    name: str
    check_merge: bool = True

    def __call__(self, tmp: Path) -> tuple[dict, dict]:
        """(what the report keeps of the stage, its measurements: peak_gpu_mb on a GPU)."""
        stages = declare(self.settings, self.p, self.out, self.inputs, self.verbose, self.echo, self.plan, self.check_merge)
        return measured_build(next(s for s in stages if s.name == self.name), self.p.device, tmp)


def measured_build(stage: Stage, device: torch.device, tmp: Path) -> tuple[dict, dict]:
    """Build `stage` into `tmp`: (what the report keeps of it, its measurements: peak_gpu_mb on a GPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    info = stage.build(tmp)
    release()  # what the stage freed goes back before the next stage starts
    return info, ({"peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20)} if cuda else {})


def in_process(stages: list[Stage], device: torch.device) -> Callable[[str], Callable[[Path], tuple[dict, dict]]]:
    """A StageRunner job for stages built in this process (the stage commands): the named one's build."""
    by_name = {s.name: s for s in stages}
    return lambda name: functools.partial(measured_build, by_name[name], device)


def run(settings: RunSettings, verbose: bool = False, echo: bool = True, workers: str | None = None) -> dict:
    """The whole pipeline; returns the report (also written to DIR/report.json, .md and .html).

    Each stage (merged/, gptq/, drift/; merged-original/ and gptq-original/ for --candidates
    gptq-original) is committed atomically with a manifest; with settings.resume a stage whose
    manifest verifies against the current inputs and settings is reused. workers="auto" builds each
    stage in a fresh worker process (forked on CPU when io.isolated.single_threaded_parent was called
    first, spawned otherwise); None builds them in this process."""
    torch.manual_seed(settings.seed)
    p = prepare(settings)
    settings = effective(settings, p)
    if echo and p.plan is not None and p.plan.note:
        print(f"[qmerge] {p.plan.note}", flush=True)
    out = Path(settings.out).resolve()
    method = worker_method(workers, p.device)
    plan = memory_plan(settings, p, out, forked_workers=method == "fork")
    for line in plan.lines() if echo else ():
        print(f"[qmerge] {line}", flush=True)
    plan.check()  # before DIR exists: a run that cannot fit leaves nothing behind
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    StageCommitter(out).clean_partials()
    inputs = inputs_record(settings, p)
    runner = StageRunner(out, settings.resume, echo, functools.partial(StageJob, settings, p, out, inputs, verbose, echo, plan), method, settings.verify_inputs)
    try:
        for stage in declare(settings, p, out, inputs, verbose, echo, plan):
            runner.run(stage)
    except BaseException:
        if created and not outputs_made(out):
            shutil.rmtree(out, ignore_errors=True)  # nothing finished: leave nothing behind
        raise
    finally:
        shutil.rmtree(scratch_dir(out), ignore_errors=True)
    rep = report_of(settings, p, out, inputs, runner, plan)
    write_outputs(rep, settings, out, echo)
    return rep


def outputs_made(out: Path) -> bool:
    """Whether a run directory holds a finished output: a stage committed other than DIR/nf4, the
    base as trained, which is the run's own intermediate (a merge that fails on bad input leaves
    nothing behind)."""
    return any(m.stem != "nf4" for m in (out / MANIFESTS).glob("*.json"))


def scratch_dir(out: Path) -> Path:
    """Offload folder and on-disk reference cache of this run (a hidden partial: removed at the end,
    or by the next run after a crash). Named by the run's process, which a forked stage worker
    inherits as RUN_PID, so the run's cleanup finds what its workers wrote."""
    return out / f".scratch{PARTIAL}{RUN_PID}"


def declare(settings: RunSettings, p: Prepared, out: Path, inputs: dict, verbose: bool, echo: bool, plan: Plan, check_merge: bool = True) -> list[Stage]:
    """The stages this run needs, in order: each one's key includes the keys of those it reads."""
    common = common_parts(settings, p.device)
    hashes = {"base": inputs["base"]["sha256"], "adapter": inputs["adapter"]["sha256"], **common}
    calibration = calibration_key(p.calibration)
    kinds = settings.evaluated
    where = plan.placement(scratch_dir(out))
    stages, nf4_dir = [], None
    if settings.reference_kind == "qlora" and not p.prequantized and not p.fused_experts:  # the base quantized once, read by merge, verify and drift
        stages.append(Stage("nf4", dict(hashes), functools.partial(_nf4_base, p, settings.nf4)))
        nf4_dir = out / "nf4"
    stages.append(merged_stage("merged", settings.merge_into, p, settings.nf4, settings.merged_dtype, hashes, echo, where, nf4_dir, check_merge))
    if "gptq" in kinds:
        search_in = (plan, nf4_dir or p.base_dir) if settings.search else None
        stages.append(gptq_stage("gptq", "merged", p, out, settings, calibration, common, verbose, echo, search_in))
    if "gptq-original" in kinds:  # the GPTQ most tools' users would ship: of the original-base merge
        stages.append(merged_stage("merged-original", "original", p, settings.nf4, settings.merged_dtype, hashes, echo, where, None))
        stages.append(gptq_stage("gptq-original", "merged-original", p, out, settings, calibration, common, verbose))
    stages.append(drift_stage(settings, p, out, kinds, [s.name for s in stages], common, echo, plan, nf4_dir or p.base_dir))
    return stages


def common_parts(settings: RunSettings, device: torch.device) -> dict:
    """What every stage's key holds: qmerge's version, the library versions (an upgraded stack may
    produce other outputs), the device type and its arithmetic, and the 4-bit settings."""
    # "arithmetic": without native bf16, GPTQ and the noise floor compute in float32 (qmerge.models.precision)
    return {"qmerge": VERSION, "versions": library_versions(), "device": device.type, "arithmetic": describe(torch.bfloat16, device), "nf4": asdict(settings.nf4)}


def calibration_key(windows: torch.Tensor) -> str:
    """The calibration windows in order: GPTQ's result depends on it."""
    return text.stream_sha256(windows)


def _nf4_base(p: Prepared, nf4: NF4Settings, tmp: Path) -> dict:
    """DIR/nf4: the base as the training run's load quantized it (merge.nf4base)."""
    return {"quantized": write_nf4_base(p.base_dir, tmp, nf4, p.device, p.allow_pickle, p.trust_remote_code)}


def merged_stage(name: str, into: str, p: Prepared, nf4: NF4Settings, dtype: str, hashes: dict, echo: bool, where: Placement, nf4_dir: Path | None,
                 check_merge: bool = True) -> Stage:
    """DIR/merged: the adapters merged into the weights as trained (into="nf4": read from DIR/nf4
    when the run made it, or a pre-quantized base as stored) or the 16-bit ones, checked against
    PEFT's own merge and logits before it is committed (the merged model for that resident or
    streamed as the memory plan says; unless `check_merge` is off: `merge_adapter(verify=False)`)."""
    base = nf4_dir or p.base_dir

    def build(tmp: Path) -> dict:
        result = merge(base, p.mix, tmp, nf4, dtype, p.device, into=into, show_progress=echo, allow_pickle=p.allow_pickle, trust_remote_code=p.trust_remote_code)
        if not check_merge:
            return asdict(result)
        windows = p.evaluations[0].windows[:SEQUENCES, :SEQ_LEN]
        check = verify(tmp, base, p.mix, nf4, replace(where, stream=None, offload_dir=None), reference_kind(into), windows, p.trust_remote_code, where, where.offload_dir)
        if echo:
            print(f"[qmerge] {name}: {check.line()}", flush=True)
        raise_if_failed(check)
        return {**asdict(result), "verify": check.summary()}

    return Stage(name, dict(dtype=dtype, into=into, **hashes), build, after=("nf4",) if nf4_dir else ())


def gptq_stage(name: str, source: str, p: Prepared, out: Path, settings: RunSettings, calibration: str, common: dict, verbose: bool, echo: bool = False,
               search_in: tuple[Plan, Path] | None = None) -> Stage:
    """DIR/gptq: GPTQModel's quantization of a merged stage's checkpoint; with `search_in` (--search:
    the memory plan and the as-trained base), the checkpoint the drift-budget search chose, and its
    trials in DIR/gptq/search.json."""
    gptq = settings.gptq
    parts = dict(gptq=asdict(gptq), calibration=calibration, seed=settings.seed, **common)

    def build(tmp: Path) -> dict:
        if search_in is None:
            quantize(out / source, tmp, p.calibration, gptq, p.device, verbose, p.trust_remote_code)
            return {}
        plan, as_trained = search_in
        reference = load_reference(as_trained, p.mix, settings.nf4, plan.reference_placement(), p.trust_remote_code, settings.reference_kind)
        job = search.Job(out / source, p.calibration, p.evaluations[0].windows, gptq, p.linears, p.device, settings.max_kld, plan.eval_batch,
                         plan.cache_budget, verbose, p.trust_remote_code, echo, plain=_committed_plain(out, name, source, parts))
        search.run(job, reference, tmp)
        return {}

    search_key = dict(search=settings.max_kld, evals=text.stream_sha256(p.evaluations[0].windows)) if search_in else {}
    return Stage(name, {**parts, **search_key}, build, after=(source,))


def _committed_plain(out: Path, name: str, source: str, parts: dict) -> list[Path] | None:
    """The files of DIR/`name` when it holds what a plain run's stage of these `parts` made from this
    run's `source` stage (a plain run before the search, in the same DIR): the search's first trial, reused."""
    committer = StageCommitter(out)
    source_key = committer.key(source)
    if source_key is None or committer.reusable(name, key_of(**parts, **{f"{source}_stage": source_key})) is None:
        return None
    return [out / name / rel for rel in committer.listed(name)]


def drift_stage(settings: RunSettings, p: Prepared, out: Path, kinds: tuple[str, ...], after: list[str], common: dict, echo: bool, plan: Plan, as_trained: Path) -> Stage:
    """DIR/drift: every candidate scored against the reference (loaded from `as_trained`) on every eval
    set, held as the memory plan says (resident or streamed; the reference cache in memory or on
    disk; the eval batch)."""
    where = plan.placement(scratch_dir(out))
    src = candidates.Sources(out, p.base_dir, p.mix, settings.nf4, settings.gptq, settings.merged_dtype, p.linears, where, p.trust_remote_code, settings.checkpoints, p.nf4_linears)
    names = {kind: candidates.display_name(kind, settings.gptq, settings.merge_into, settings.search) for kind in kinds}
    batch = plan.eval_batch  # float32 GEMMs of another batch shape may round differently: part of the key

    def build(tmp: Path) -> dict:
        reference = load_reference(as_trained, p.mix, settings.nf4, plan.reference_placement(), p.trust_remote_code, settings.reference_kind)
        rows: dict[str, dict] = {}
        tokenizer = AutoTokenizer.from_pretrained(p.base_dir, trust_remote_code=p.trust_remote_code)
        texts = samples.Samples(settings.data, p.evaluations[0].name, p.evaluations[0].windows, tokenizer, plan.decode_budget)
        texts.add(candidates.REFERENCES[settings.reference_kind], reference)

        def builder(kind: str, name: str) -> Callable[[], torch.nn.Module]:
            def build_one() -> torch.nn.Module:
                model, layout = candidates.build(kind, src, reference)
                rows[name] = candidates.describe(kind, layout, src)
                if samples.shown(kind, settings.final_kind) and plan.stream is None:  # a streamed model would read all its weights per decoded token
                    texts.add(name, model)
                return model

            return build_one

        results = evaluate(
            reference, {name: builder(kind, name) for kind, name in names.items()}, [e.windows for e in p.evaluations], settings.floor_dtype,
            batch_size=batch, show_progress=echo, scored_bytes=[e.scored_bytes for e in p.evaluations], cache_budget=plan.cache_budget, cache_dir=where.offload_dir,
        )
        if settings.floor_dtype != "float32":
            rows[candidates.NOISE_FLOOR] = candidates.describe("noise-floor", None, src)
        evaluations = [eval_section(e, r, settings.data.seq_len) for e, r in zip(p.evaluations, results)]
        (tmp / "candidates.json").write_text(files.dumps(rows, indent=2))
        (tmp / "evaluations.json").write_text(files.dumps(evaluations, indent=2))
        (tmp / "samples.json").write_text(files.dumps(texts.section(candidates.REFERENCES[settings.reference_kind]), indent=2))
        return {}

    evals = [(e.name, text.stream_sha256(e.windows)) for e in p.evaluations]
    parts = dict(candidates=kinds, grid=asdict(settings.gptq), evals=evals, batch=batch, samples=samples.key(settings.data), **common)
    return Stage("drift", parts, build, after=tuple(after))


def eval_section(e: EvalSet, result: dict, seq_len: int) -> dict:
    """One eval set's section of report.json: its token stream and every candidate's drift on it."""
    first = next(iter(result["metrics"].values()))
    return {
        "eval": e.name, "windows": len(e.windows), "seq_len": seq_len, "tokens": first["tokens"], "scored_bytes": e.scored_bytes,
        "windows_sha256": text.stream_sha256(e.windows), "calibration_overlap": e.overlap, **result,
    }
