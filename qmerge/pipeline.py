"""`qmerge run`: validate everything, then NF4 base → merge → GPTQ → drift → report.

Everything that can be checked is checked before DIR is created, so bad input leaves nothing behind.
Each stage is then committed atomically with a manifest (qmerge.stages): a crash loses no finished
stage, --resume reuses the verified ones, and an existing DIR is touched only with --overwrite or
--resume.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from qmerge import __version__, card, data, drift, recipe, report
from qmerge.adapter import check_fits, load_adapter
from qmerge.errors import QmergeError
from qmerge.inputs import load_base_config, resolve, tree_sha256
from qmerge.merge import merge
from qmerge.nf4 import REFERENCES, Prequantized, as_trained, effective_settings, quantized_linear_names, reference_kind
from qmerge.quantize import check_group_size, check_target, quantize, read_quant_log, servers
from qmerge.stages import StageStore, key_of
from qmerge.settings import NF4Settings, RunSettings
from qmerge.verify import SEQUENCES, raise_if_failed, verify


MERGED = {"nf4": "merged (NF4 base + adapter)", "original": "merged (original base + adapter)"}


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
        yield
        rec = {"wall_s": round(time.perf_counter() - start, 3), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.device.type == "cuda":
            rec["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        self.records[name] = rec


@dataclass(frozen=True)
class Prepared:
    """Everything validated before the first heavy stage."""

    base_dir: Path
    adapter_dir: Path
    adapter: object
    device: torch.device
    calibration: torch.Tensor
    evaluation: torch.Tensor
    eval_bytes: int  # UTF-8 bytes of the scored eval text
    in_features: set[int]  # of every layer GPTQ quantizes
    nf4: NF4Settings  # the run's 4-bit settings: the user's, or a pre-quantized base's own
    prequantized: bool  # the base is a bitsandbytes 4-bit checkpoint (no 16-bit weights)


def prepare(settings: RunSettings) -> Prepared:
    """Fail in seconds on anything that would fail later: settings, inputs, shapes, group size, data."""
    settings.validate()
    check_out(Path(settings.out), settings.overwrite, settings.resume)
    device = pick_device(settings.device)
    base_dir = resolve(settings.base, "base")
    adapter_dir = resolve(settings.adapter, "adapter")
    remote = settings.trust_remote_code
    config = load_base_config(base_dir, remote)
    adapter = load_adapter(adapter_dir, settings.allow_pickle)
    source = as_trained(base_dir, config, settings.nf4, settings.merge_into, settings.allow_pickle, remote)
    nf4 = effective_settings(config, source, settings.nf4, settings.nf4_given)
    check_fits(adapter, source)
    shapes = {n: source.shape(f"{n}.weight") for n in quantized_linear_names(config, nf4, remote)}
    in_features = {shape[1] for shape in shapes.values()}
    if not settings.skip_gptq:
        check_group_size(shapes, settings.gptq)
        check_target(settings.gptq, in_features)
    check_vocabulary(adapter_dir, config, remote)
    warn_if_other_base(adapter, settings.base, base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=remote)
    d = settings.data
    calibration = data.windows(d.calibration, "calibration", tokenizer, d.seq_len, d.calibration_samples)
    evaluation = data.windows(d.eval, "eval", tokenizer, d.seq_len, d.eval_samples)
    data.check_disjoint(calibration, evaluation)
    return Prepared(
        base_dir, adapter_dir, adapter, device, calibration, evaluation, data.scored_bytes(evaluation, tokenizer), in_features, nf4,
        isinstance(source, Prequantized),
    )


def effective(settings: RunSettings, p: Prepared) -> RunSettings:
    """The settings the run really uses: a pre-quantized base's own 4-bit settings, and no "original"
    context row where it cannot be built (no 16-bit weights) or is the merged candidate itself."""
    drop = p.prequantized or settings.merge_into == "original"
    return replace(settings, nf4=p.nf4, baselines=tuple(b for b in settings.baselines if not (drop and b == "original")))


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

    Each stage (merged/, gptq/, drift/) is committed atomically with a manifest; with
    settings.resume a stage whose manifest verifies against the current inputs and settings is reused."""
    torch.manual_seed(settings.seed)
    p = prepare(settings)
    settings = effective(settings, p)
    ref_kind = reference_kind(settings.merge_into)
    out = Path(settings.out).resolve()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    store = StageStore(out)
    store.clean_partials()
    stages = Stages(p.device)
    base_sha, adapter_sha = tree_sha256(p.base_dir), tree_sha256(p.adapter_dir)
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
        def build_merged(tmp: Path, info: dict) -> None:
            result = merge(
                p.base_dir, p.adapter, tmp, settings.nf4, settings.merged_dtype, p.device, settings.merge_into,
                show_progress=echo, allow_pickle=settings.allow_pickle, trust_remote_code=settings.trust_remote_code,
            )
            info.update(asdict(result))
            check = verify(tmp, p.base_dir, p.adapter_dir, settings.nf4, p.device, ref_kind, p.evaluation[:SEQUENCES], settings.trust_remote_code)
            info["verify"] = check.summary()
            if echo:
                print(f"[qmerge] {check.line()}", flush=True)
            raise_if_failed(check)

        merged_key = stage("merged", dict(base=base_sha, adapter=adapter_sha, dtype=settings.merged_dtype, into=settings.merge_into, **common), build_merged)
        candidates = {MERGED[settings.merge_into]: out / "merged"}
        gptq_key = None
        if not settings.skip_gptq:
            parts = dict(merged=merged_key, gptq=asdict(settings.gptq), calibration=key_of(windows=sorted(data.window_hashes(p.calibration))), seed=settings.seed, **common)
            gptq_key = stage("gptq", parts, lambda tmp, info: quantize(out / "merged", tmp, p.calibration, settings.gptq, p.device, verbose, settings.trust_remote_code))
            candidates[f"gptq {settings.gptq.bits}-bit g{settings.gptq.group_size}"] = out / "gptq"
        def build_drift(tmp: Path, info: dict) -> None:
            reference = drift.load_reference(p.base_dir, p.adapter_dir, settings.nf4, p.device, settings.trust_remote_code, ref_kind)
            models = {name: drift.load_candidate(path, p.device, settings.trust_remote_code) for name, path in candidates.items()}
            for kind in settings.baselines:
                models[drift.BASELINES[kind]] = drift.load_baseline(kind, p.base_dir, p.adapter, p.device, settings.trust_remote_code)
            metrics = drift.evaluate(reference, models, p.evaluation, settings.nf4.compute_dtype, show_progress=echo, scored_bytes=p.eval_bytes)
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))

        stage("drift", dict(merged=merged_key, gptq=gptq_key, baselines=settings.baselines, eval=key_of(windows=sorted(data.window_hashes(p.evaluation))), **common), build_drift)
    except BaseException:
        if created and not any((out / name).exists() for name in ("merged", "gptq", "drift")):
            shutil.rmtree(out, ignore_errors=True)  # nothing finished: leave nothing behind
        raise
    metrics = json.loads((out / "drift" / "metrics.json").read_text())
    rep = {
        "schema_version": report.SCHEMA_VERSION,
        "inputs": {
            "base": {
                "spec": settings.base, "path": str(p.base_dir), "from_hub": not Path(settings.base).expanduser().exists(), "sha256": base_sha,
                "prequantized": p.prequantized,
            },
            "adapter": {"spec": settings.adapter, "path": str(p.adapter_dir), "sha256": adapter_sha},
            "calibration_windows": len(p.calibration),
            "eval_windows": len(p.evaluation),
        },
        "settings": settings.to_dict(),
        "reference": {"name": REFERENCES[ref_kind], "kind": ref_kind},
        "versions": report.library_versions(),
        "device": report.device_info(p.device),
        "merge": infos["merged"],
        "stages": stages.records,
        "candidates": {name: {"path": str(path), "compute_dtype": str(drift.candidate_dtype(path, p.device)).removeprefix("torch.")} for name, path in candidates.items()},
        "metrics": metrics,
        "budgets": budgets(settings, metrics[list(candidates)[-1]]),
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


def budgets(settings: RunSettings, final: dict) -> dict:
    """The quality budgets the user set, checked on the final checkpoint (GPTQ, or merged with --skip-gptq)."""
    out = {}
    for name, limit, value in (("max_kld", settings.max_kld, final["kld_mean"]), ("max_ppl_ratio", settings.max_ppl_ratio, final["ppl_ratio"])):
        if limit is not None:
            out[name] = {"limit": limit, "value": value, "ok": value <= limit}
    return out
