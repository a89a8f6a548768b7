"""The Python API, one function per CLI command; the CLI is a thin layer over it.

    from qmerge import run
    result = run("meta-llama/Llama-3.1-8B", "my-org/qlora", "out/llama", group_size=128, max_kld=0.05)
    result.gptq, result.report["evaluations"][0]["metrics"], result.budgets_ok

Settings are the CLI's long options with underscores (the keys of a recipe, qmerge.recipe.KEYS),
validated by the same code as the CLI's flags, so defaults and errors are the CLI's: a stage
function takes the settings that apply to its stage (qmerge.commands: MERGE_KEYS, QUANTIZE_KEYS,
EVAL_KEYS, VERIFY_KEYS) and refuses others by name. Every function returns paths and numbers and
raises QmergeError on bad input; it prints nothing unless progress=True (the CLI's default; --quiet
turns it off).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from qmerge import commands, pipeline, recipe
from qmerge.errors import QmergeError
from qmerge.eval.verify import Verification
from qmerge.eval.verify import verify as verify_merged
from qmerge.io.inputs import resolve
from qmerge.io.progress import showing
from qmerge.merge.adapter import load_mix
from qmerge.report.search import verdict as search_verdict

__all__ = ["run", "merge_adapter", "gptq_quantize", "evaluate", "verify", "push", "RunResult", "QuantizeResult"]


@dataclass(frozen=True)
class RunResult:
    """A run directory and its report (`qmerge run`, or `qmerge eval` of what the directory holds)."""

    out: Path
    report: dict
    pushed: str | None = None  # the repository URL, with push_to

    @property
    def merged(self) -> Path:
        return self.out / "merged"

    @property
    def gptq(self) -> Path | None:
        return None if self.report["settings"]["skip_gptq"] else self.out / "gptq"

    @property
    def budgets_ok(self) -> bool:
        return all(b["ok"] for b in self.report["budgets"].values())

    def summary(self) -> dict:
        """What a deploy script gates on: paths, the final checkpoint's headline numbers, budgets."""
        name = self.report["final"]
        m = self.report["evaluations"][0]["metrics"][name]
        return {
            "out": str(self.out),
            "merged": str(self.merged),
            "gptq": str(self.gptq) if self.gptq else None,
            "report": str(self.out / "report.json"),
            "final": {"name": name, **{k: m[k] for k in ("kld_mean", "kld_mean_se", "kld_p99", "ppl", "ppl_ratio", "top1_agreement")}},
            "budgets": self.report["budgets"],
            "budgets_ok": self.budgets_ok,
            **({"search": search_verdict(self.report["search"])} if self.report.get("search") else {}),
            **({"pushed": self.pushed} if self.pushed else {}),
        }


def run(base: str | None = None, adapter: str | list[str] | None = None, out: str | Path | None = None, *, recipe_file: str | Path | None = None,
        overwrite: bool = False, resume: bool = False, verbose: bool = False, progress: bool = False, push_to: str | None = None, private: bool = False,
        workers: str | None = None, **settings) -> RunResult:
    """NF4 base → merge → GPTQ → drift → report; `settings` override the recipe, which overrides
    defaults. With push_to="owner/name" the final checkpoint is uploaded at the end (as `push`
    does), unless a quality budget failed. workers="auto": each heavy stage in a fresh process (see
    qmerge.io.isolated)."""
    values = recipe.load(Path(recipe_file)) if recipe_file else {}
    unknown = sorted(set(settings) - set(recipe.KEYS))
    if unknown:
        raise QmergeError(f"unknown setting {unknown[0]!r}; the settings are {', '.join(sorted(recipe.KEYS))}")
    given = {"base": base, "adapter": adapter, "out": str(out) if out is not None else None, **settings}
    values.update({k: v for k, v in given.items() if v is not None})
    resolved = recipe.to_settings(values, overwrite=overwrite, resume=resume)
    if push_to is not None:
        check_repo_id(push_to)
    with showing(progress):
        report = pipeline.run(resolved, verbose=verbose, echo=progress, workers=workers)
    result = RunResult(Path(resolved.out).resolve(), report)
    return result if push_to is None else push_final(result, push_to, private)


def push_final(result: RunResult, repo_id: str, private: bool = False) -> RunResult:
    """`run --push-to`: the final checkpoint (DIR/gptq, or DIR/merged with --skip-gptq) uploaded by
    `push`, unless a quality budget failed (then a warning, and nothing is uploaded)."""
    if not result.budgets_ok:
        print(f"qmerge: warning: not pushed to {repo_id}: a quality budget failed", file=sys.stderr, flush=True)
        return result
    return RunResult(result.out, result.report, push(result.gptq or result.merged, repo_id, private=private))


def merge_adapter(base: str, adapter: str | list[str], out: str | Path, *, overwrite: bool = False, resume: bool = False, verify: bool = True,
                  progress: bool = False, **settings) -> Path:
    """Write `adapter` ("DIR_OR_HUB_ID[:WEIGHT]", or a list of them merged as Σ weight·Δ) merged into
    `base` as a plain HF checkpoint at `out`: into the 4-bit weights it was trained on
    (merge_into="nf4") or the 16-bit ones ("original"); checked against PEFT's own merge and logits
    unless verify=False (a VerifyError then). This is `qmerge run`'s merge stage: its manifest goes
    to OUT/../manifests/NAME.json. Settings: qmerge.commands.MERGE_KEYS (merged_dtype, device,
    revision, the training-time 4-bit settings, ...)."""
    with showing(progress):
        return commands.merge(base, adapter, Path(out), settings, overwrite, resume, verify, progress)


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    log: list[dict]  # GPTQModel's per-module losses


def gptq_quantize(merged: str | Path, out: str | Path, *, overwrite: bool = False, resume: bool = False, verbose: bool = False, progress: bool = False,
                  **settings) -> QuantizeResult:
    """GPTQ of a merged checkpoint with GPTQModel into `out` (the portable profile by default; group
    size auto resolved on the checkpoint's layers, an explicit one checked against them); the base and
    adapter are not needed. This is `qmerge run`'s GPTQ stage, with its manifest in
    OUT/../manifests/NAME.json. Settings: qmerge.commands.QUANTIZE_KEYS (bits, group_size, calibration,
    calibration_samples, seq_len, device, ...)."""
    with showing(progress):
        return QuantizeResult(*commands.quantize(Path(merged), Path(out), settings, overwrite, resume, verbose, progress))


def evaluate(base: str, adapter: str | list[str], out: str | Path, *, overwrite: bool = False, resume: bool = False, verbose: bool = False,
             progress: bool = False, **settings) -> RunResult:
    """Drift of what run directory `out` holds (out/merged and out/gptq, those present) and of the
    `checkpoints` made elsewhere ({name: directory or hub id}, or ["NAME=DIR_OR_HUB_ID", ...]: a GPTQ
    or AWQ checkpoint of the same fine-tune, say) against the model as trained, written as `qmerge
    run` writes it (out/drift, out/report.json, .md, .html). Settings: every run setting
    (qmerge.commands.EVAL_KEYS)."""
    if isinstance(settings.get("checkpoints"), dict):
        settings["checkpoints"] = [f"{name}={path}" for name, path in settings["checkpoints"].items()]
    with showing(progress):
        out, report = commands.evaluate(base, adapter, Path(out), settings, overwrite, resume, verbose, progress)
    return RunResult(out, report)


def verify(merged: str | Path, base: str, adapter: str | list[str], *, progress: bool = False, **settings) -> Verification:
    """Compare a merged checkpoint with PEFT's own merge of `adapter` into `base` as the adapter saw it
    (merge_into="nf4": the 4-bit weights; "original": the 16-bit ones; several adapters: their
    weighted mix), tensor by tensor and by logits against the unmerged model. Settings:
    qmerge.commands.VERIFY_KEYS (merge_into, the training-time 4-bit settings, device, revision,
    trust_remote_code). Returns the numbers; `.ok` is the verdict."""
    from qmerge.models.device import pick_device
    from qmerge.settings import reference_kind

    merged = Path(merged)
    s = commands.settings_of("verify", commands.VERIFY_KEYS, {**settings, "base": base, "adapter": adapter, "out": str(merged)})
    s.validate()
    if not (merged / "config.json").exists():
        raise QmergeError(f"{merged} is not a merged checkpoint (no config.json); pass DIR/merged")
    base_dir, mix = resolve(s.base, "base", s.revision, s.trust_remote_code), load_mix(s.adapter)
    nf4 = commands.base_settings(base_dir, s)
    with showing(progress):
        return verify_merged(merged, base_dir, mix, nf4, pick_device(s.device), reference_kind(s.merge_into), trust_remote_code=s.trust_remote_code)


def check_repo_id(repo_id: str) -> None:
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise QmergeError(f"repository id {repo_id!r} must look like owner/name")


def push(directory: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload a qmerge checkpoint folder with huggingface_hub (token from HF_TOKEN or the login cache,
    never logged); returns the repository URL."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    if not (directory / "config.json").exists() or not any(directory.glob("*.safetensors")):
        raise QmergeError(f"{directory} is not a checkpoint (config.json and *.safetensors); pass DIR/gptq or DIR/merged")
    check_repo_id(repo_id)
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message="Upload GPTQ checkpoint made by qmerge", ignore_patterns=["quantize.log"])
    return str(url)
