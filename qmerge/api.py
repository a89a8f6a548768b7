"""The Python API, one function per CLI verb and stage; the CLI is a thin layer over it.

    from qmerge import run
    result = run("meta-llama/Llama-3.1-8B", "my-org/qlora", "out/llama", group_size=128, max_kld=0.05)
    result.gptq, result.report["evaluations"][0]["metrics"], result.budgets_ok

Settings are the CLI's long options with underscores (see qmerge.recipe.KEYS); every function
returns paths and numbers instead of printing, and raises QmergeError on bad input.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from pathlib import Path

from qmerge import pipeline, recipe
from qmerge.errors import QmergeError
from qmerge.eval.drift import evaluate as evaluate_models
from qmerge.eval.verify import Verification
from qmerge.eval.verify import verify as verify_merged
from qmerge.io import text
from qmerge.io.atomic import building
from qmerge.io.inputs import load_base_config, resolve
from qmerge.merge.adapter import load_mix
from qmerge.merge.source import as_trained, effective_settings
from qmerge.merge.streaming import merge
from qmerge.models.checkpoints import load_candidate
from qmerge.models.device import pick_device
from qmerge.models.reference import load_reference
from qmerge.prepare import check_out
from qmerge.quant.gptq import quantize
from qmerge.settings import GPTQSettings, NF4Settings, reference_kind


@dataclass(frozen=True)
class RunResult:
    out: Path
    report: dict

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
        }


def run(base: str | None = None, adapter: str | list[str] | None = None, out: str | Path | None = None, *, recipe_file: str | Path | None = None,
        overwrite: bool = False, resume: bool = False, verbose: bool = False, progress: bool = False, workers: str | None = None, **settings) -> RunResult:
    """NF4 base → merge → GPTQ → drift → report; `settings` override the recipe, which overrides defaults.
    workers="auto": each heavy stage in a fresh process (see qmerge.io.isolated)."""
    values = recipe.load(Path(recipe_file)) if recipe_file else {}
    unknown = sorted(set(settings) - set(recipe.KEYS))
    if unknown:
        raise QmergeError(f"unknown setting {unknown[0]!r}; the settings are {', '.join(sorted(recipe.KEYS))}")
    given = {"base": base, "adapter": adapter, "out": str(out) if out is not None else None, **settings}
    values.update({k: v for k, v in given.items() if v is not None})
    resolved = recipe.to_settings(values, overwrite=overwrite, resume=resume)
    report = pipeline.run(resolved, verbose=verbose, echo=progress, workers=workers)
    return RunResult(Path(resolved.out).resolve(), report)


def merge_adapter(base: str, adapter: str | list[str], out: str | Path, *, into: str = "nf4", dtype: str = "bfloat16", device: str = "auto",
          nf4: NF4Settings | None = None, overwrite: bool = False) -> Path:
    """Write base + adapter merged into the NF4 round trip (into="nf4", the weights as trained) or the
    original 16-bit weights (into="original") as a plain HF checkpoint at `out`. `adapter` is one
    "DIR_OR_HUB_ID[:WEIGHT]" or a list of them, merged as Σ weight·Δ."""
    if into not in ("nf4", "original"):
        raise QmergeError(f"into={into!r}; use 'nf4' (the weights as trained) or 'original'")
    out = Path(out).resolve()
    check_out(out, overwrite)
    base_dir = resolve(base, "base")
    given = tuple(f.name for f in fields(NF4Settings)) if nf4 else ()  # an explicit NF4Settings is given whole
    nf4 = base_settings(base_dir, nf4 or NF4Settings(), given, into)
    with building(out) as work:
        merge(base_dir, load_mix(_specs(adapter)), work, nf4, dtype, pick_device(device), into, show_progress=False)
    return out


def base_settings(base_dir: Path, nf4: NF4Settings, given: tuple[str, ...], into: str = "nf4", trust_remote_code: bool = False) -> NF4Settings:
    """The 4-bit settings for `base_dir`: `nf4`, or a pre-quantized base's own, which refuses the
    fields in `given` (set by the user) when they disagree with it."""
    nf4.validate()
    config = load_base_config(base_dir, trust_remote_code)
    return effective_settings(config, as_trained(base_dir, config, nf4, into, trust_remote_code=trust_remote_code), nf4, given)


def verify(merged: str | Path, base: str, adapter: str | list[str], *, merge_into: str = "nf4", device: str = "auto", trust_remote_code: bool = False,
           **nf4_values) -> Verification:
    """Compare a merged checkpoint with PEFT's own merge of `adapter` into `base` as the adapter saw it
    (merge_into="nf4": the 4-bit weights; "original": the 16-bit ones; several adapters: their weighted mix), tensor by tensor and by logits
    against the unmerged model. `nf4_values`: the training-time 4-bit settings as recipe keys
    (quant_type, double_quant, nf4_blocksize, ...). Returns the numbers; `.ok` is the verdict."""
    unknown = sorted(set(nf4_values) - set(k for k, (section, _) in recipe.KEYS.items() if section == "nf4"))
    if unknown:
        raise QmergeError(f"unknown setting {unknown[0]!r} for verify; the 4-bit settings are quant_type, double_quant, nf4_blocksize, compute_dtype, quant_storage, skip_modules")
    if merge_into not in ("nf4", "original"):
        raise QmergeError(f"--merge-into {merge_into!r} is unknown; use nf4 or original")
    merged = Path(merged)
    if not (merged / "config.json").exists():
        raise QmergeError(f"{merged} is not a merged checkpoint (no config.json); pass DIR/merged")
    base_dir, mix = resolve(base, "base"), load_mix(_specs(adapter))
    nf4 = base_settings(base_dir, recipe.nf4_settings(nf4_values), recipe.given_nf4(nf4_values), merge_into, trust_remote_code)
    return verify_merged(merged, base_dir, mix, nf4, pick_device(device), reference_kind(merge_into), trust_remote_code=trust_remote_code)


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    log: list[dict]  # GPTQModel's per-module losses


def gptq_quantize(merged: str | Path, out: str | Path, *, calibration: str = "stdlib", calibration_samples: int = 128, seq_len: int = 512,
             gptq: GPTQSettings | None = None, device: str = "auto", overwrite: bool = False, verbose: bool = False) -> QuantizeResult:
    """GPTQ of a merged checkpoint with GPTQModel into `out` (portable profile by default)."""
    from transformers import AutoTokenizer

    gptq = gptq or GPTQSettings()
    gptq.validate()
    merged = Path(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    windows = text.windows(calibration, "calibration", tokenizer, seq_len, calibration_samples)
    out = Path(out).resolve()
    check_out(out, overwrite)
    with building(out) as work:
        log = quantize(merged, work, windows, gptq, pick_device(device), verbose)
    return QuantizeResult(out, log)


def evaluate(base: str, adapter: str | list[str], candidates: dict[str, str | Path], *, eval: str = "stdlib", eval_samples: int = 32, seq_len: int = 512,
             nf4: NF4Settings | None = None, device: str = "auto") -> dict[str, dict]:
    """Metrics of each candidate checkpoint against the unmerged QLoRA model as trained."""
    from transformers import AutoTokenizer

    nf4 = nf4 or NF4Settings()
    base_dir, mix, dev = resolve(base, "base"), load_mix(_specs(adapter)), pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    windows = text.windows(eval, "eval", tokenizer, seq_len, eval_samples)
    reference = load_reference(base_dir, mix, nf4, dev)
    models = {name: functools.partial(load_candidate, Path(path), dev) for name, path in candidates.items()}  # loaded one at a time
    result = evaluate_models(reference, models, [windows], nf4.compute_dtype, show_progress=False, scored_bytes=[text.scored_bytes(windows, tokenizer)])
    return result[0]["metrics"]


def _specs(adapter: str | list[str]) -> tuple[str, ...]:
    return (adapter,) if isinstance(adapter, str) else tuple(adapter)


def push(directory: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload a qmerge checkpoint folder with huggingface_hub (token from HF_TOKEN or the login cache,
    never logged); returns the repository URL."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    if not (directory / "config.json").exists() or not any(directory.glob("*.safetensors")):
        raise QmergeError(f"{directory} is not a checkpoint (config.json and *.safetensors); pass DIR/gptq or DIR/merged")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise QmergeError(f"repository id {repo_id!r} must look like owner/name")
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message="Upload GPTQ checkpoint made by qmerge", ignore_patterns=["quantize.log"])
    return str(url)
