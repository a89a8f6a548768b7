"""report.json (versioned schema) and report.md, plus the table printed at the end of a run."""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

SCHEMA_VERSION = 1
LIBRARIES = ("qmerge", "torch", "transformers", "peft", "bitsandbytes", "gptqmodel", "optimum", "safetensors", "accelerate")


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "platform": platform.platform(), "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write(report: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(report))


def table(report: dict) -> str:
    """One row per candidate against the reference: the numbers people compare."""
    head = "| model | PPL ± SE | PPL ratio | mean KLD ± SE | KLD p99 | KLD max | top-1 agree ± SE |\n|---|---|---|---|---|---|---|\n"
    rows = []
    metrics = report["metrics"]
    first = next(iter(metrics.values()), None)
    if first:
        rows.append(f"| {report.get('reference', {}).get('name', 'reference (QLoRA as trained)')} | {first['ppl_ref']:.4f} ± {first['ppl_ref_se']:.4f} | 1 | 0 | 0 | 0 | 100% |")
    for name, m in metrics.items():
        rows.append(
            f"| {name} | {m['ppl']:.4f} ± {m['ppl_se']:.4f} | {m['ppl_ratio']:.5f} | {m['kld_mean']:.3e} ± {m['kld_mean_se']:.1e} "
            f"| {m['kld_p99']:.3e} | {m['kld_max']:.3e} | {100 * m['top1_agreement']:.2f}% ± {100 * m['top1_agreement_se']:.2f} |"
        )
    return head + "\n".join(rows) + "\n"


def detail_table(report: dict) -> str:
    """The rest of llama.cpp's statistics, per candidate."""
    head = (
        "| model | KLD median | KLD p90 | KLD p99.9 | top-5 agree ± SE | Δp mean ± SE | Δp RMS | Δp p1 / p99 | NLL corr | bits/byte (ref) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name, m in report["metrics"].items():
        bpb = f"{m['bits_per_byte']:.4f} ({m['bits_per_byte_ref']:.4f})" if "bits_per_byte" in m else "-"
        rows.append(
            f"| {name} | {m['kld_median']:.3e} | {m['kld_p90']:.3e} | {m['kld_p999']:.3e} | {100 * m['top5_agreement']:.2f}% ± {100 * m['top5_agreement_se']:.2f} "
            f"| {m['delta_p_mean']:+.2e} ± {m['delta_p_mean_se']:.1e} | {m['delta_p_rms']:.2e} | {m['delta_p_p1']:+.2e} / {m['delta_p_p99']:+.2e} "
            f"| {m['nll_correlation']:.5f} | {bpb} |"
        )
    return head + "\n".join(rows) + "\n"


def merged_into(report: dict) -> str:
    """How the merge was made: into the 4-bit weights as trained (of a 16-bit or a pre-quantized base), or the 16-bit ones."""
    if report["settings"].get("merge_into", "nf4") == "original":
        return ("merged into the original 16-bit weights (`--merge-into original`: a plain LoRA, or the merge "
                "PEFT-on-fp16, unsloth and LLaMA-Factory make)")
    n = report["settings"]["nf4"]
    settings = f"bitsandbytes {n['quant_type']}, double quant {n['double_quant']}, blocksize {n['blocksize']}"
    if report["inputs"]["base"].get("prequantized"):
        return (f"merged into the 4-bit weights stored in this pre-quantized checkpoint ({settings}: the weights the "
                "adapter was trained against; it holds no 16-bit weights, so the report has no \"merged into original\" row)")
    return f"merged into the NF4 round trip of the base (the weights the adapter was trained against: {settings})"


def reference_words(report: dict) -> str:
    n = report["settings"]["nf4"]
    if report.get("reference", {}).get("kind") == "lora":
        return "the 16-bit base (a plain LoRA: no 4-bit load)"
    how = "stored pre-quantized by bitsandbytes" if report["inputs"]["base"].get("prequantized") else "loaded in 4-bit by bitsandbytes"
    return f"base {how} ({n['quant_type']}, double quant {n['double_quant']}, blocksize {n['blocksize']})"


def verified(report: dict) -> str:
    """The merge stage's check against PEFT's own merge and logits (qmerge.verify), when it ran."""
    v = report.get("merge", {}).get("verify")
    if not v:
        return ""
    worst = v["worst"][0] if v["worst"] else {"key": "-", "max_rel_err": 0.0}
    return (
        f"\nVerified: every merged tensor equals PEFT's merge of the adapter into the base as trained within {v['merged_dtype']} "
        f"rounding (worst `{worst['key']}`, max rel err {worst['max_rel_err']:.3g}), and the mean KLD to the unmerged "
        f"model is {v['kld_mean']:.3g} (limit {v['kld_limit']:.0e}) on {v['sequences']} sequences.\n"
    )


def markdown(report: dict) -> str:
    s = report["settings"]
    stages = "\n".join(
        f"| {name} | reused (manifest verified) | - | - |" if st.get("reused") else f"| {name} | {st['wall_s']:.1f} | {st['peak_rss_mb']:.0f} | {st.get('peak_gpu_mb') or '-'} |"
        for name, st in report["stages"].items()
    )
    first = next(iter(report["metrics"].values()), {"tokens": 0, "windows": 0})
    return f"""# qmerge report

Base `{report['inputs']['base']['path']}` + adapter `{report['inputs']['adapter']['path']}`, {merged_into(report)}, then GPTQ
{s['gptq']['bits']}-bit, group {s['gptq']['group_size']}, sym={s['gptq']['sym']}, desc_act={s['gptq']['desc_act']}.
{verified(report)}
## Drift against the model as trained

Reference: {reference_words(report)} with the adapter unmerged (PEFT). All models compute in float32.
Eval: {first['windows']} windows of {s['data']['seq_len']} tokens from `{s['data']['eval']}` ({first['tokens']} scored
next-token predictions: every position of each window predicted from the window's own prefix). KLD is
KL(reference ‖ model). Standard errors are clustered by window; the PPL ratio is paired (same tokens).

{table(report)}
{detail_table(report)}
Δp = p(actual next token) under the model − under the reference; bits per byte = total NLL in bits
over the UTF-8 bytes of the scored text (tokenizer-independent).

The noise-floor row is the reference itself with its 4-bit layers computing in the training
compute dtype ({s['nf4']['compute_dtype']}): drift below it is below what the training run's own arithmetic moved.

## Stages

| stage | wall s | peak RSS MB (process so far) | peak GPU MB |
|---|---|---|---|
{stages}

Device: {report['device']['device']}{(' (' + report['device']['gpu'] + ')') if 'gpu' in report['device'] else ''}; libraries: {', '.join(f'{k} {v}' for k, v in report['versions'].items() if v)}.
"""
