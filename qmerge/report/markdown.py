"""report.md, and the drift table printed at the end of a run and put in the model card."""

from __future__ import annotations

def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A pipe table; a '|' inside a cell is escaped so it does not end the cell."""
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _size(entry: dict) -> list[str]:
    if entry.get("size_bytes") is None:
        return ["-", "-"]
    bpw = "-" if entry["bits_per_weight"] is None else f"{entry['bits_per_weight']:.3f}"
    return [f"{entry['size_bytes'] / 1e6:.1f}", bpw]


TABLE = ["model", "size MB", "bits/weight", "PPL ± SE", "PPL ratio", "mean KLD ± SE", "KLD % of fine-tune", "KLD p99", "KLD max", "top-1 agree ± SE"]
DETAIL = ["model", "KLD median", "KLD p90", "KLD p99.9", "top-5 agree ± SE", "Δp mean ± SE", "Δp RMS", "Δp p1 / p99", "NLL corr", "bits/byte (ref)"]


def table(report: dict, index: int = 0) -> str:
    """One row per candidate against the reference on eval set `index`: the numbers people compare.
    With the base-without-adapter row present, each mean KLD also reads as a share of the base's,
    i.e. of how far the fine-tune itself moved the model."""
    metrics = report["evaluations"][index]["metrics"]
    base = next((metrics[n] for n, c in report["candidates"].items() if c["kind"] == "base" and n in metrics), None)
    rows = []
    first = next(iter(metrics.values()), None)
    if first:
        rows.append([report["reference"]["name"], "-", "-", f"{first['ppl_ref']:.4f} ± {first['ppl_ref_se']:.4f}", "1", "0", "0", "0", "0", "100%"])
    for name, m in metrics.items():
        share = f"{100 * m['kld_mean'] / base['kld_mean']:.3g}%" if base and base["kld_mean"] else "-"
        rows.append([
            name, *_size(report["candidates"].get(name, {})), f"{m['ppl']:.4f} ± {m['ppl_se']:.4f}", f"{m['ppl_ratio']:.5f}",
            f"{m['kld_mean']:.3e} ± {m['kld_mean_se']:.1e}", share, f"{m['kld_p99']:.3e}", f"{m['kld_max']:.3e}",
            f"{100 * m['top1_agreement']:.2f}% ± {100 * m['top1_agreement_se']:.2f}",
        ])
    return md_table(TABLE, rows)


def detail_table(report: dict, index: int = 0) -> str:
    """The rest of llama.cpp's statistics, per candidate, on eval set `index`."""
    rows = []
    for name, m in report["evaluations"][index]["metrics"].items():
        bpb = f"{m['bits_per_byte']:.4f} ({m['bits_per_byte_ref']:.4f})" if "bits_per_byte" in m else "-"
        rows.append([
            name, f"{m['kld_median']:.3e}", f"{m['kld_p90']:.3e}", f"{m['kld_p999']:.3e}", f"{100 * m['top5_agreement']:.2f}% ± {100 * m['top5_agreement_se']:.2f}",
            f"{m['delta_p_mean']:+.2e} ± {m['delta_p_mean_se']:.1e}", f"{m['delta_p_rms']:.2e}", f"{m['delta_p_p1']:+.2e} / {m['delta_p_p99']:+.2e}",
            f"{m['nll_correlation']:.5f}", bpb,
        ])
    return md_table(DETAIL, rows)


def layer_table(report: dict, index: int = 0) -> str:
    """Hidden-state drift per decoder layer and candidate (relative Frobenius error / mean cosine),
    beside GPTQ's own per-module loss summed over the layer: where the error enters."""
    layers = report["evaluations"][index]["layers"]
    names = list(layers)
    loss: dict[int, float] = {}
    for row in report.get("gptq_log", []):
        loss[row["layer"]] = loss.get(row["layer"], 0.0) + row["loss"]
    rows = []
    for i in range(max((len(v) for v in layers.values()), default=0)):
        cells = [f"{layers[n][i]['rel_error']:.2e} / {layers[n][i]['cosine']:.6f}" for n in names]
        rows.append([str(i), *cells, f"{loss[i]:.3e}" if i in loss else "-"])
    return md_table(["layer", *names, "GPTQ loss (sum over modules)"], rows)


def _evaluation_section(report: dict, index: int) -> str:
    e = report["evaluations"][index]
    overlap = f" **{100 * e['calibration_overlap']:.1f}% of these windows are also in the calibration set (--allow-overlap).**" if e.get("calibration_overlap") else ""
    return f"""### Eval set `{e['eval']}`

{e['windows']} windows of {e['seq_len']} tokens ({e['tokens']} scored next-token predictions, {e['scored_bytes']} bytes; token stream sha256 `{e['windows_sha256'][:16]}…`).{overlap}

{table(report, index)}
{detail_table(report, index)}"""


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
    """The merge stage's check against PEFT's own merge and logits (qmerge.eval.verify), when it ran."""
    v = report.get("merge", {}).get("verify")
    if not v:
        return ""
    worst = v["worst"][0] if v["worst"] else {"key": "-", "max_rel_err": 0.0}
    return (
        f"\nVerified: every merged tensor equals PEFT's merge of the adapter into the base as trained within {v['merged_dtype']} "
        f"rounding (worst `{worst['key']}`, max rel err {worst['max_rel_err']:.3g}), and the mean KLD to the unmerged "
        f"model is {v['kld_mean']:.3g} (limit {v['kld_limit']:.0e}) on {v['sequences']} sequences.\n"
    )


def noise_floor_words(report: dict) -> str:
    """What the noise-floor row is, and whether this machine computed it natively or emulated it."""
    floor = next((c for c in report["candidates"].values() if c["kind"] == "noise-floor"), None)
    if floor is None:
        plain = report.get("reference", {}).get("kind") == "lora"
        return "No noise-floor row: " + ("a plain LoRA's reference has no 4-bit layers." if plain else "the training compute dtype is float32, as the reference's.")
    words = (f"The noise-floor row is the reference itself with its 4-bit layers computing in the training compute dtype "
             f"({floor['compute_dtype']}): drift below it is below what the training run's own arithmetic moved.")
    if floor.get("arithmetic") == "emulated":
        words += (f" This device has no native {floor['compute_dtype']} arithmetic, so it was emulated: float32 products of "
                  f"{floor['compute_dtype']}-rounded inputs, weights and biases, the output rounded to {floor['compute_dtype']}.")
    return words


def markdown(report: dict) -> str:
    s = report["settings"]
    stages = "\n".join(
        f"| {name} | reused (manifest verified) | - | - |" if st.get("reused") else f"| {name} | {st['wall_s']:.1f} | {st['peak_rss_mb']:.0f} | {st.get('peak_gpu_mb') or '-'} |"
        for name, st in report["stages"].items()
    )
    sections = "\n".join(_evaluation_section(report, i) for i in range(len(report["evaluations"])))
    return f"""# qmerge report

Base `{report['inputs']['base']['path']}` + adapter `{report['inputs']['adapter']['path']}`, {merged_into(report)}, then GPTQ
{s['gptq']['bits']}-bit, group {s['gptq']['group_size']}, sym={s['gptq']['sym']}, desc_act={s['gptq']['desc_act']}.
Final checkpoint (budgets apply to it, on the first eval set): **{report['final']}**.
{verified(report)}
## Drift against the model as trained

Reference: {reference_words(report)} with the adapter unmerged (PEFT). All models compute in float32 (each
candidate's compute dtype is in report.json). Every position of each window is predicted from the
window's own prefix. KLD is KL(reference ‖ model). Standard errors are clustered by window; the PPL
ratio is paired (same tokens). "KLD % of fine-tune" is the mean KLD as a share of the base-without-adapter
row's: how much of what the fine-tune changed the candidate's drift amounts to.

Size is the bytes of tensor data of the candidate's checkpoint (read from the written files, or computed
exactly for the format of those built in memory: PEFT's 4-bit merge as bitsandbytes saves it, RTN as a
GPTQ v1 checkpoint of the same grid). Bits/weight = 8 × bytes of the linear layers that get quantized
(codes, scales, zero points, indices, 4-bit statistics) ÷ their weight count; none for context rows.

{sections}
Δp = p(actual next token) under the model − under the reference; bits per byte = total NLL in bits
over the UTF-8 bytes of the scored text (tokenizer-independent).

{noise_floor_words(report)}

## Where the error enters (eval set `{report['evaluations'][0]['eval']}`)

Hidden state after each decoder layer (the last one after the final norm, as transformers returns
it) against the reference's on the same tokens: relative Frobenius error ‖h − h_ref‖ / ‖h_ref‖ over all
tokens / mean per-token cosine.

{layer_table(report)}
## Stages

| stage | wall s | peak RSS MB (process so far) | peak GPU MB |
|---|---|---|---|
{stages}

Device: {report['device']['device']}{(' (' + report['device']['gpu'] + ')') if 'gpu' in report['device'] else ''}; libraries: {', '.join(f'{k} {v}' for k, v in report['versions'].items() if v)}.
"""
