"""`qmerge run`: inputs → NF4 base → merge → GPTQ → drift → report, as a list of declared stages.

Everything that can be checked is checked first (qmerge.prepare), before DIR is created, so bad
input leaves nothing behind. Each stage is then committed atomically with a manifest
(qmerge.io.manifests): a crash loses no finished stage, --resume reuses the verified ones, and an
existing DIR is touched only with --overwrite or --resume.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from qmerge import recipe
from qmerge.eval import candidates, samples, search
from qmerge.eval.drift import evaluate
from qmerge.eval.verify import SEQ_LEN, SEQUENCES, raise_if_failed, verify
from qmerge.io import text
from qmerge.io.manifests import StageCommitter, key_of
from qmerge.io.memory import PeakRSS, release
from qmerge.merge.streaming import merge
from qmerge.models.device import device_info
from qmerge.models.reference import load_reference
from qmerge.prepare import EvalSet, Prepared, effective, inputs_record, prepare
from qmerge.quant import dynamic
from qmerge.quant.gptq import quantize, read_quant_log
from qmerge.quant.servers import servers
from qmerge.report import card, files
from qmerge.report.assemble import assemble
from qmerge.report.markdown import table
from qmerge.report.schema import library_versions
from qmerge.settings import VERSION, NF4Settings, RunSettings, reference_kind


@dataclass(frozen=True)
class Stage:
    """One step of a run. Its output, DIR/name, is a function of `parts` (the inputs and settings it
    reads) and of the keys of the stages it reads (`after`), which together make its key."""

    name: str
    parts: dict
    build: Callable[[Path], dict]  # writes the stage's files into a directory; returns what the report keeps of it
    after: tuple[str, ...] = ()


@dataclass
class StageRunner:
    """Reuses (with --resume, when the manifest verifies) or builds each stage in turn, recording its
    wall time and peak memory."""

    out: Path
    device: torch.device
    resume: bool
    echo: bool
    keys: dict[str, str] = field(default_factory=dict)
    infos: dict[str, dict] = field(default_factory=dict)
    records: dict[str, dict] = field(default_factory=dict)

    def run(self, stage: Stage) -> None:
        committer = StageCommitter(self.out)
        parts = {**stage.parts, **{f"{up}_stage": self.keys[up] for up in stage.after}}
        key = key_of(**parts)
        info = committer.reusable(stage.name, key) if self.resume else None
        if info is not None:
            self.records[stage.name] = {"reused": True}
            self._say(f"{stage.name}: reused (manifest verified)")
        else:
            info = {}
            with self._measured(stage.name), committer.commit(stage.name, parts, info) as tmp:
                info.update(stage.build(tmp))
        self.keys[stage.name], self.infos[stage.name] = key, info

    @contextlib.contextmanager
    def _measured(self, name: str):
        self._say(f"{name} ...")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        with PeakRSS() as peak:
            yield
            release()  # what the stage freed goes back before the next stage starts
        record = {"wall_s": round(time.perf_counter() - start, 3), "peak_rss_mb": peak.mb}
        if self.device.type == "cuda":
            record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        self.records[name] = record

    def _say(self, line: str) -> None:
        if self.echo:
            print(f"[qmerge] {line}", flush=True)


def run(settings: RunSettings, verbose: bool = False, echo: bool = True) -> dict:
    """The whole pipeline; returns the report (also written to DIR/report.json, .md and .html).

    Each stage (merged/, gptq/, drift/; merged-original/ and gptq-original/ for --candidates
    gptq-original) is committed atomically with a manifest; with settings.resume a stage whose
    manifest verifies against the current inputs and settings is reused."""
    torch.manual_seed(settings.seed)
    p = prepare(settings)
    settings = effective(settings, p)
    out = Path(settings.out).resolve()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    StageCommitter(out).clean_partials()
    inputs = inputs_record(settings, p)
    runner = StageRunner(out, p.device, settings.resume, echo)
    try:
        for stage in declare(settings, p, out, inputs, verbose, echo):
            runner.run(stage)
    except BaseException:
        if created and not (out / "manifests").exists():
            shutil.rmtree(out, ignore_errors=True)  # nothing finished: leave nothing behind
        raise
    rep = report_of(settings, p, out, inputs, runner)
    write_outputs(rep, settings, out, echo)
    return rep


def declare(settings: RunSettings, p: Prepared, out: Path, inputs: dict, verbose: bool, echo: bool, check_merge: bool = True) -> list[Stage]:
    """The stages this run needs, in order: each one's key includes the keys of those it reads."""
    common = common_parts(settings, p.device)
    hashes = {"base": inputs["base"]["sha256"], "adapter": inputs["adapter"]["sha256"], **common}
    calibration = calibration_key(p.calibration)
    kinds = settings.evaluated
    stages = [merged_stage("merged", settings.merge_into, p, settings.nf4, settings.merged_dtype, hashes, echo, check_merge)]
    if "gptq" in kinds:
        stages.append(gptq_stage("gptq", "merged", p, out, settings, calibration, common, verbose, echo))
    if "gptq-original" in kinds:  # the GPTQ most tools' users would ship: of the original-base merge
        stages.append(merged_stage("merged-original", "original", p, settings.nf4, settings.merged_dtype, hashes, echo))
        stages.append(gptq_stage("gptq-original", "merged-original", p, out, settings, calibration, common, verbose))
    stages.append(drift_stage(settings, p, out, kinds, [s.name for s in stages], common, echo))
    return stages


def common_parts(settings: RunSettings, device: torch.device) -> dict:
    """What every stage's key holds: qmerge's version, the device type and the 4-bit settings."""
    return {"qmerge": VERSION, "device": device.type, "nf4": asdict(settings.nf4)}


def calibration_key(windows: torch.Tensor) -> str:
    return key_of(windows=sorted(text.window_hashes(windows)))


def merged_stage(name: str, into: str, p: Prepared, nf4: NF4Settings, dtype: str, hashes: dict, echo: bool, check_merge: bool = True) -> Stage:
    """DIR/merged: the adapters merged into the weights as trained (into="nf4") or the 16-bit ones,
    checked against PEFT's own merge and logits before it is committed (unless `check_merge` is off:
    `merge_adapter(verify=False)`)."""

    def build(tmp: Path) -> dict:
        result = merge(p.base_dir, p.mix, tmp, nf4, dtype, p.device, into=into, show_progress=echo, allow_pickle=p.allow_pickle, trust_remote_code=p.trust_remote_code)
        if not check_merge:
            return asdict(result)
        windows = p.evaluations[0].windows[:SEQUENCES, :SEQ_LEN]
        check = verify(tmp, p.base_dir, p.mix, nf4, p.device, reference_kind(into), windows, p.trust_remote_code)
        if echo:
            print(f"[qmerge] {name}: {check.line()}", flush=True)
        raise_if_failed(check)
        return {**asdict(result), "verify": check.summary()}

    return Stage(name, dict(dtype=dtype, into=into, **hashes), build)


def gptq_stage(name: str, source: str, p: Prepared, out: Path, settings: RunSettings, calibration: str, common: dict, verbose: bool, echo: bool = False) -> Stage:
    """DIR/gptq: GPTQModel's quantization of a merged stage's checkpoint; with --search, the checkpoint
    the drift-budget search chose, and its trials in DIR/gptq/search.json."""
    gptq = settings.gptq
    searching = settings.search and name == "gptq"

    def build(tmp: Path) -> dict:
        if searching:
            run_search(out / source, tmp, p, settings, verbose, echo)
        else:
            quantize(out / source, tmp, p.calibration, gptq, p.device, verbose, p.trust_remote_code)
        return {}

    search_key = dict(search=settings.max_kld, evals=text.stream_sha256(p.evaluations[0].windows)) if searching else {}
    return Stage(name, dict(gptq=asdict(gptq), calibration=calibration, seed=settings.seed, **search_key, **common), build, after=(source,))


def run_search(merged: Path, tmp: Path, p: Prepared, settings: RunSettings, verbose: bool, echo: bool) -> None:
    job = search.Job(merged, p.calibration, p.evaluations[0].windows, settings.gptq, p.linears, p.device, settings.max_kld,
                     settings.data.batch_on(p.device.type), verbose, p.trust_remote_code, echo)
    reference = load_reference(p.base_dir, p.mix, settings.nf4, p.device, p.trust_remote_code, settings.reference_kind)
    with tempfile.TemporaryDirectory(prefix="qmerge-search-") as scratch:
        record = search.run(job, reference, tmp, Path(scratch))
    (tmp / "search.json").write_text(json.dumps(record, indent=2))


def drift_stage(settings: RunSettings, p: Prepared, out: Path, kinds: tuple[str, ...], after: list[str], common: dict, echo: bool) -> Stage:
    """DIR/drift: every candidate scored against the reference on every eval set."""
    src = candidates.Sources(out, p.base_dir, p.mix, settings.nf4, settings.gptq, settings.merged_dtype, p.linears, p.device, p.trust_remote_code, settings.checkpoints)
    names = {kind: candidates.display_name(kind, settings.gptq, settings.merge_into, settings.search) for kind in kinds}
    batch = settings.data.batch_on(p.device.type)  # float32 GEMMs of another batch shape may round differently: part of the key

    def build(tmp: Path) -> dict:
        reference = load_reference(p.base_dir, p.mix, settings.nf4, p.device, p.trust_remote_code, settings.reference_kind)
        rows: dict[str, dict] = {}
        texts = samples.Samples(settings.data, p.evaluations[0].name, p.evaluations[0].windows, AutoTokenizer.from_pretrained(p.base_dir, trust_remote_code=p.trust_remote_code))
        texts.add(candidates.REFERENCES[settings.reference_kind], reference)

        def builder(kind: str, name: str) -> Callable[[], torch.nn.Module]:
            def build_one() -> torch.nn.Module:
                model, layout = candidates.build(kind, src, reference)
                rows[name] = candidates.describe(kind, layout, src)
                if samples.shown(kind, settings.final_kind):
                    texts.add(name, model)
                return model

            return build_one

        results = evaluate(
            reference, {name: builder(kind, name) for kind, name in names.items()}, [e.windows for e in p.evaluations], settings.floor_dtype,
            batch_size=batch, show_progress=echo, scored_bytes=[e.scored_bytes for e in p.evaluations],
        )
        if settings.floor_dtype != "float32":
            rows[candidates.NOISE_FLOOR] = candidates.describe("noise-floor", None, src)
        evaluations = [eval_section(e, r, settings.data.seq_len) for e, r in zip(p.evaluations, results)]
        (tmp / "candidates.json").write_text(json.dumps(rows, indent=2))
        (tmp / "evaluations.json").write_text(json.dumps(evaluations, indent=2))
        (tmp / "samples.json").write_text(json.dumps(texts.section(candidates.REFERENCES[settings.reference_kind]), indent=2))
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


def report_of(settings: RunSettings, p: Prepared, out: Path, inputs: dict, runner: StageRunner) -> dict:
    """The report, from the stage results on disk and what the run recorded."""
    gptq = not settings.skip_gptq
    found = _read_json(out / "gptq" / "search.json") if gptq else None
    verdicts = servers(settings.gptq, p.in_features) if gptq else {}
    if found:
        verdicts = dynamic.servers_with(verdicts, found["rows"][found["chosen"]]["dynamic"], settings.gptq, p.linears)
    return assemble(
        inputs=inputs, settings=settings.to_dict(),
        reference={"name": candidates.REFERENCES[settings.reference_kind], "kind": settings.reference_kind},
        versions=library_versions(), device=device_info(p.device), merge=runner.infos["merged"], stages=runner.records,
        candidates=json.loads((out / "drift" / "candidates.json").read_text()),
        evaluations=json.loads((out / "drift" / "evaluations.json").read_text()),
        final=candidates.display_name(settings.final_kind, settings.gptq, settings.merge_into, settings.search),
        servers=verdicts, gptq_log=read_quant_log(out / "gptq") if gptq else [],
        recipe=recipe.resolved(settings), samples=_read_json(out / "drift" / "samples.json"), search=found,
    )


def _read_json(path: Path):
    """A stage file added since the stage's first release (None when a reused stage predates it)."""
    return json.loads(path.read_text()) if path.exists() else None


def write_outputs(rep: dict, settings: RunSettings, out: Path, echo: bool) -> None:
    files.write(rep, out)
    recipe.dump(settings, out / "recipe.resolved.yaml")
    if not settings.skip_gptq:
        (out / "gptq" / "README.md").write_text(card.render(rep))
    if echo:
        print(table(rep))
        print(f"[qmerge] merged checkpoint: {out / 'merged'}")
        if not settings.skip_gptq:
            print(f"[qmerge] GPTQ checkpoint:   {out / 'gptq'}")
        print(f"[qmerge] report:            {out / 'report.md'} (and report.json)")
