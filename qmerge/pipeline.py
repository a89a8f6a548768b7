"""`qmerge run`: validate everything, then NF4 base → merge → GPTQ → drift → report.

Everything that can be checked is checked before DIR is created, so bad input leaves nothing behind.
Each stage is then committed atomically with a manifest (qmerge.stages): a crash loses no finished
stage, --resume reuses the verified ones, and an existing DIR is touched only with --overwrite or
--resume.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from qmerge import __version__, candidates, card, data, drift, recipe, report
from qmerge.adapter import Mix, load_mix
from qmerge.edits import build_edits
from qmerge.errors import QmergeError
from qmerge.inputs import load_base_config, resolve, tree_sha256
from qmerge.merge import merge
from qmerge.nf4 import REFERENCES, Prequantized, as_trained, effective_settings, quantized_linear_names, reference_kind
from qmerge.quantize import check_group_size, check_target, quantize, read_quant_log, servers
from qmerge.rss import PeakRSS, release
from qmerge.stages import StageStore, key_of
from qmerge.settings import NF4Settings, RunSettings
from qmerge.verify import SEQ_LEN, SEQUENCES, raise_if_failed, verify



def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QmergeError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def check_out(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Nothing a user has is replaced without --overwrite (or continued without --resume)."""
    if out.exists() and not out.is_dir():
        raise QmergeError(f"output path {out} is a file; choose a directory for --out")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise QmergeError(f"output directory {out} exists and is not empty; choose another --out, pass --overwrite, or --resume a run")


@dataclass
class Stages:
    """Wall time and peak memory of each stage, for the report."""

    device: torch.device
    records: dict[str, dict] = field(default_factory=dict)

    @contextlib.contextmanager
    def time(self, name: str, echo: bool):
        if echo:
            print(f"[qmerge] {name} ...", flush=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        with PeakRSS() as peak:
            yield
            release()  # what the stage freed goes back before the next stage starts
        rec = {"wall_s": round(time.perf_counter() - start, 3), "peak_rss_mb": peak.mb}
        if self.device.type == "cuda":
            rec["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        self.records[name] = rec


@dataclass(frozen=True)
class EvalSet:
    """One eval source cut into windows."""

    name: str  # the source as given (preset name or path)
    windows: torch.Tensor
    scored_bytes: int  # UTF-8 bytes of the scored text
    overlap: float  # fraction of its windows also in the calibration set (0 unless --allow-overlap)


@dataclass(frozen=True)
class Prepared:
    """Everything validated before the first heavy stage."""

    base_dir: Path
    mix: Mix  # the adapters with their weights
    device: torch.device
    calibration: torch.Tensor
    evaluations: tuple[EvalSet, ...]
    linears: dict[str, tuple[int, int]]  # (out, in) of every linear layer that gets quantized
    nf4: NF4Settings  # the run's 4-bit settings: the user's, or a pre-quantized base's own
    prequantized: bool  # the base is a bitsandbytes 4-bit checkpoint (no 16-bit weights)

    @property
    def in_features(self) -> set[int]:
        return {shape[1] for shape in self.linears.values()}


def prepare(settings: RunSettings) -> Prepared:
    """Fail in seconds on anything that would fail later: settings, inputs, shapes, group size, data."""
    settings.validate()
    check_out(Path(settings.out), settings.overwrite, settings.resume)
    device = pick_device(settings.device)
    base_dir = resolve(settings.base, "base")
    remote = settings.trust_remote_code
    config = load_base_config(base_dir, remote)
    mix = load_mix(settings.adapter, settings.allow_pickle)
    source = as_trained(base_dir, config, settings.nf4, settings.merge_into, settings.allow_pickle, remote)
    nf4 = effective_settings(config, source, settings.nf4, settings.nf4_given)
    mix = build_edits(mix, config, source, remote).mix
    shapes = {n: tuple(source.shape(f"{n}.weight")) for n in quantized_linear_names(config, nf4, remote)}
    in_features = {shape[1] for shape in shapes.values()}
    if not settings.skip_gptq:
        check_group_size(shapes, settings.gptq)
        check_target(settings.gptq, in_features)
    for part in mix:
        check_vocabulary(part.adapter.directory, config, remote)
        warn_if_other_base(part.adapter, settings.base, base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=remote)
    d = settings.data
    calibration = data.windows(d.calibration, "calibration", tokenizer, d.seq_len, d.calibration_samples)
    evaluations = []
    for name in d.eval:
        windows = data.windows(name, "eval", tokenizer, d.seq_len, d.eval_samples)
        overlap = data.check_disjoint(calibration, windows, name, allow=d.allow_overlap)
        evaluations.append(EvalSet(name, windows, data.scored_bytes(windows, tokenizer), overlap))
    return Prepared(base_dir, mix, device, calibration, tuple(evaluations), shapes, nf4, isinstance(source, Prequantized))


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
    return replace(settings, nf4=p.nf4, candidates=tuple(k for k in settings.candidates if k not in drop))


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


def run(settings: RunSettings, verbose: bool = False, echo: bool = True) -> dict:
    """The whole pipeline; returns the report (also written to DIR/report.json and DIR/report.md).

    Each stage (merged/, gptq/, drift/; merged-original/ and gptq-original/ for --candidates gptq-original) is committed atomically with a manifest; with
    settings.resume a stage whose manifest verifies against the current inputs and settings is reused."""
    torch.manual_seed(settings.seed)
    p = prepare(settings)
    settings = effective(settings, p)
    ref_kind = reference_kind(settings.merge_into)
    # the noise floor toggles the reference's 4-bit layers to the training compute dtype: a plain LoRA's has none
    floor_dtype = settings.nf4.compute_dtype if ref_kind == "qlora" else "float32"
    out = Path(settings.out).resolve()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    store = StageStore(out)
    store.clean_partials()
    stages = Stages(p.device)
    base_sha, adapter_inputs = tree_sha256(p.base_dir), adapter_report(settings.adapter, p.mix)
    adapter_sha = adapter_inputs["sha256"]
    common = {"qmerge": __version__, "device": p.device.type, "nf4": asdict(settings.nf4)}

    def stage(name: str, parts: dict, build) -> str:
        """Reuse or build one stage; returns its key, which downstream stages' keys include."""
        key = key_of(**parts)
        info = store.reusable(name, key) if settings.resume else None
        if info is not None:
            stages.records[name] = {"reused": True}
            if echo:
                print(f"[qmerge] {name}: reused (manifest verified)", flush=True)
        else:
            info = {}
            with stages.time(name, echo), store.build(name, parts, info) as tmp:
                build(tmp, info)
        infos[name] = info
        return key

    infos: dict[str, dict] = {}

    try:
        def merged_stage(name: str, into: str) -> str:
            def build(tmp: Path, info: dict) -> None:
                result = merge(
                    p.base_dir, p.mix, tmp, settings.nf4, settings.merged_dtype, p.device, into=into,
                    show_progress=echo, allow_pickle=settings.allow_pickle, trust_remote_code=settings.trust_remote_code,
                )
                info.update(asdict(result))
                check = verify(tmp, p.base_dir, p.mix, settings.nf4, p.device, reference_kind(into), p.evaluations[0].windows[:SEQUENCES, :SEQ_LEN], settings.trust_remote_code)
                info["verify"] = check.summary()
                if echo:
                    print(f"[qmerge] {name}: {check.line()}", flush=True)
                raise_if_failed(check)

            return stage(name, dict(base=base_sha, adapter=adapter_sha, dtype=settings.merged_dtype, into=into, **common), build)

        def gptq_stage(name: str, source: str, source_key: str) -> str:
            parts = dict(merged=source_key, gptq=asdict(settings.gptq), calibration=calibration_key, seed=settings.seed, **common)
            return stage(name, parts, lambda tmp, info: quantize(out / source, tmp, p.calibration, settings.gptq, p.device, verbose, settings.trust_remote_code))

        kinds = settings.evaluated
        calibration_key = key_of(windows=sorted(data.window_hashes(p.calibration)))
        merged_key = merged_stage("merged", settings.merge_into)
        gptq_keys = {}
        if "gptq" in kinds:
            gptq_keys["gptq"] = gptq_stage("gptq", "merged", merged_key)
        if "gptq-original" in kinds:  # the GPTQ most tools' users would ship: of the original-base merge
            gptq_keys["gptq-original"] = gptq_stage("gptq-original", "merged-original", merged_stage("merged-original", "original"))
        src = candidates.Sources(
            out, p.base_dir, p.mix, settings.nf4, settings.gptq, settings.merged_dtype, p.linears, p.device, settings.trust_remote_code
        )

        def build_drift(tmp: Path, info: dict) -> None:
            reference = drift.load_reference(p.base_dir, p.mix, settings.nf4, p.device, settings.trust_remote_code, ref_kind)
            rows = {}

            def builder(kind: str, name: str) -> drift.Build:
                def build() -> torch.nn.Module:
                    model, layout = candidates.build(kind, src, reference)
                    rows[name] = candidates.describe(kind, layout, src)
                    return model

                return build

            names = {kind: candidates.display_name(kind, settings.gptq, settings.merge_into) for kind in kinds}
            results = drift.evaluate(
                reference, {name: builder(kind, name) for kind, name in names.items()}, [e.windows for e in p.evaluations], floor_dtype,
                batch_size=batch, show_progress=echo, scored_bytes=[e.scored_bytes for e in p.evaluations],
            )
            if floor_dtype != "float32":
                rows[drift.NOISE_FLOOR] = candidates.describe("noise-floor", None, src)
            evaluations = [eval_section(e, r, settings.data.seq_len) for e, r in zip(p.evaluations, results)]
            (tmp / "candidates.json").write_text(json.dumps(rows, indent=2))
            (tmp / "evaluations.json").write_text(json.dumps(evaluations, indent=2))

        evals = [(e.name, data.stream_sha256(e.windows)) for e in p.evaluations]
        batch = settings.data.batch_on(p.device.type)  # float32 GEMMs of another batch shape may round differently: part of the key
        stage("drift", dict(merged=merged_key, gptq=gptq_keys, candidates=kinds, grid=asdict(settings.gptq), evals=evals, batch=batch, **common), build_drift)
    except BaseException:
        if created and not (out / "manifests").exists():
            shutil.rmtree(out, ignore_errors=True)  # nothing finished: leave nothing behind
        raise
    evaluations = json.loads((out / "drift" / "evaluations.json").read_text())
    final = candidates.display_name(settings.final_kind, settings.gptq, settings.merge_into)
    rep = {
        "schema_version": report.SCHEMA_VERSION,
        "inputs": {
            "base": {
                "spec": settings.base, "path": str(p.base_dir), "from_hub": not Path(settings.base).expanduser().exists(), "sha256": base_sha,
                "prequantized": p.prequantized,
            },
            "adapter": adapter_inputs,
            "calibration_windows": len(p.calibration),
            "eval_windows": len(p.evaluations[0].windows),
        },
        "settings": settings.to_dict(),
        "reference": {"name": REFERENCES[ref_kind], "kind": ref_kind},
        "versions": report.library_versions(),
        "device": report.device_info(p.device),
        "merge": infos["merged"],
        "stages": stages.records,
        "candidates": json.loads((out / "drift" / "candidates.json").read_text()),
        "evaluations": evaluations,
        "final": final,
        "budgets": budgets(settings, evaluations[0]["metrics"][final]),
        "servers": servers(settings.gptq, p.in_features) if not settings.skip_gptq else {},
        "gptq_log": read_quant_log(out / "gptq") if not settings.skip_gptq else [],
        "recipe": recipe.resolved(settings),
    }
    report.write(rep, out)
    recipe.dump(settings, out / "recipe.resolved.yaml")
    if not settings.skip_gptq:
        (out / "gptq" / "README.md").write_text(card.render(rep))
    if echo:
        print(report.table(rep))
        print(f"[qmerge] merged checkpoint: {out / 'merged'}")
        if not settings.skip_gptq:
            print(f"[qmerge] GPTQ checkpoint:   {out / 'gptq'}")
        print(f"[qmerge] report:            {out / 'report.md'} (and report.json)")
    return rep


def eval_section(e: EvalSet, result: dict, seq_len: int) -> dict:
    """One eval set's section of report.json (schema v2): its token stream and every candidate's drift on it."""
    first = next(iter(result["metrics"].values()))
    return {
        "eval": e.name,
        "windows": len(e.windows),
        "seq_len": seq_len,
        "tokens": first["tokens"],
        "scored_bytes": e.scored_bytes,
        "windows_sha256": data.stream_sha256(e.windows),
        "calibration_overlap": e.overlap,
        **result,
    }


def adapter_report(specs: tuple[str, ...], mix: Mix) -> dict:
    """The adapter inputs for the report and stage keys: one adapter as {spec, path, sha256}; a mix as
    the same keys over all of it (sha256 of the parts' hashes and weights) plus each part."""
    parts = [{"spec": spec, "path": str(part.adapter.directory), "weight": part.weight, "sha256": tree_sha256(part.adapter.directory)} for spec, part in zip(specs, mix)]
    if len(parts) == 1 and parts[0]["weight"] == 1:
        return {key: parts[0][key] for key in ("spec", "path", "sha256")}
    return {
        "spec": " + ".join(specs),
        "path": " + ".join(f"{part['path']}:{part['weight']:g}" for part in parts),
        "sha256": key_of(adapters=[(part["sha256"], part["weight"]) for part in parts]),
        "parts": parts,
    }


def budgets(settings: RunSettings, final: dict) -> dict:
    """The quality budgets the user set, checked on the final checkpoint (GPTQ, or merged with --skip-gptq)."""
    out = {}
    for name, limit, value in (("max_kld", settings.max_kld, final["kld_mean"]), ("max_ppl_ratio", settings.max_ppl_ratio, final["ppl_ratio"])):
        if limit is not None:
            out[name] = {"limit": limit, "value": value, "ok": value <= limit}
    return out
