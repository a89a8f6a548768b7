"""The command line's commands and options. Every setting option is also a recipe key (dashes or
underscores) and an API keyword (underscores); a stage command takes the options of `run` that
apply to its stage, with the same meaning and defaults. None means "not given here"."""

from __future__ import annotations

import argparse
from pathlib import Path

B = argparse.BooleanOptionalAction


def _output(p: argparse.ArgumentParser, writes: str) -> None:
    p.add_argument("--recipe", type=Path, help="YAML or TOML file of settings (a run's recipe will do: the settings this command takes are read from it); flags given here override it")
    p.add_argument("--out", help=f"output directory: {writes}")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output once the new one is complete")
    p.add_argument("--resume", action="store_true", help="reuse an output whose manifest verifies against these inputs and settings")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON summary line on stdout, everything else on stderr")
    p.add_argument("--quiet", action="store_true", help="no progress bars or lines, no stage lines (errors and warnings still print)")
    p.add_argument("--verbose", action="store_true", help="show library logs (transformers, GPTQModel) and tracebacks")


def _gptq(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, help="GPTQ bits: 2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=_group_size, help="GPTQ group size: auto (default: the largest of 128, 64, 32 dividing every quantized layer), -1 per channel, or 16..")
    p.add_argument("--act-order", action=B, help="GPTQ desc_act; off in the portable profile")
    p.add_argument("--sym", action=B, help="symmetric GPTQ (default; vLLM's Marlin path needs it)")
    p.add_argument("--damp", type=float, help="GPTQ dampening fraction (default 0.01)")
    p.add_argument("--target", help="server the checkpoint must load in: any (default), transformers, vllm, sglang; refused up front if it cannot")


def _group_size(value: str) -> int | str:
    """--group-size: "auto" or an integer (validated with the other settings)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither auto nor an integer") from None


def _calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", help="calibration source: stdlib, wikitext2, hf:NAME[:CONFIG]:SPLIT[:FIELD], or a .txt/.jsonl file or folder")
    p.add_argument("--calibration-samples", type=int, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, help="tokens per window (default 512)")
    p.add_argument("--seed", type=int, help="seed (default 0)")


def _evaluation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", help="eval sources, comma-separated, same forms as --calibration (default: stdlib eval part); metrics per set")
    p.add_argument("--eval-samples", type=int, help="eval windows (default 32)")
    p.add_argument("--eval-batch", type=int, help="eval windows per forward in the drift stage (default 0: 1 on CPU, on a GPU the most its free memory holds, up to 16)")
    p.add_argument("--stream", help="hold verify's and drift's 16-bit candidates a layer at a time: auto (default: when the memory plan says they do not fit beside the reference), always, never")
    p.add_argument("--verify-inputs", action=B, help="hash every input and stage file again (default: reuse a file's hash while its size and modification time are unchanged)")
    p.add_argument("--allow-overlap", action=B, help="evaluate even on windows that are also in the calibration set (the overlapping fraction is reported)")
    p.add_argument("--candidates", help="report rows, comma-separated: merged, original, peft-nf4, rtn, gptq, gptq-original, base (default: all but gptq-original)")
    p.add_argument("--checkpoint", dest="checkpoints", action="append", help="NAME=DIR_OR_HUB_ID: also score a checkpoint made elsewhere (a GPTQ or AWQ of the same fine-tune); repeatable")
    p.add_argument("--prompts", help="prompts to complete side by side in the report: a .txt (one a line) or .jsonl (prompt, or chat messages) file (default: the first eval windows)")
    p.add_argument("--samples", type=int, help="prompts completed greedily side by side in the report (default 4, 0 for none)")
    p.add_argument("--sample-tokens", type=int, help="new tokens per completion (default 32)")
    p.add_argument("--max-kld", type=float, help="budget: fail with exit 3 if the final checkpoint's mean KLD exceeds this")
    p.add_argument("--max-ppl-ratio", type=float, help="budget: fail with exit 3 if the final checkpoint's PPL ratio exceeds this")


def _base(p: argparse.ArgumentParser) -> None:
    """How the adapter saw the base (a pre-quantized base sets the 4-bit ones itself)."""
    p.add_argument("--revision", help="the base's hub revision: branch, tag or commit (adapters pin theirs as ID@REVISION)")
    p.add_argument("--merge-into", help="nf4 (default): the 4-bit weights a QLoRA adapter was trained on; original: the 16-bit weights (a plain LoRA)")
    p.add_argument("--quant-type", help="training-time bnb_4bit_quant_type (default nf4)")
    p.add_argument("--double-quant", action=B, help="training-time bnb_4bit_use_double_quant (default on)")
    p.add_argument("--nf4-blocksize", type=int, help="training-time bitsandbytes blocksize (default 64)")
    p.add_argument("--compute-dtype", help="training-time bnb_4bit_compute_dtype (default bfloat16)")
    p.add_argument("--quant-storage", help="training-time bnb_4bit_quant_storage (default uint8)")
    p.add_argument("--skip-modules", help="comma-separated llm_int8_skip_modules of the training load")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--trust-remote-code", action=B, help="run a model's own code from its repository (off by default)")


def _inputs(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--base", required=required, help="base model: local HF directory or hub id (bf16/fp16 safetensors, or a bitsandbytes 4-bit checkpoint)")
    p.add_argument("--adapter", required=required, action="append", help="QLoRA adapter: local PEFT directory or hub id[@REVISION], optionally :WEIGHT; repeat it to merge a weighted sum of adapters")


def _merged(p: argparse.ArgumentParser) -> None:
    p.add_argument("--merged-dtype", help="dtype of DIR/merged (default bfloat16)")
    p.add_argument("--allow-pickle", action=B, help="read pickled .bin weights (they run code when loaded: trusted files only)")


def _run_options(p: argparse.ArgumentParser) -> None:
    _output(p, "DIR/merged, DIR/gptq, DIR/drift, DIR/report.*; must not exist or be empty unless --overwrite or --resume")
    _gptq(p)
    _calibration(p)
    _evaluation(p)
    _base(p)
    _merged(p)
    p.add_argument("--skip-gptq", action=B, help="stop after the merge (drift of the merged model only)")
    p.add_argument("--search", action=B, help="with --max-kld: search GPTQModel's per-module precision and options for the smallest checkpoint --target loads within the budget")
    p.add_argument("--push-to", help="upload the final checkpoint to this hub repository (owner/name) at the end, as qmerge push does; not when a budget failed")
    p.add_argument("--private", action="store_true", help="with --push-to or push: create the repository private")
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmerge", description="QLoRA adapter → NF4-faithful merge → GPTQ checkpoint → drift report")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="merge, quantize and measure a base + QLoRA adapter")
    _inputs(run)
    _run_options(run)
    _run_options(sub.add_parser("demo", help="the whole pipeline offline on the embedded SmolLM2-135M-Instruct"))
    _stage_commands(sub)
    verify = sub.add_parser("verify", help="check DIR/merged against PEFT's own merge and the unmerged model's logits (exit 4 if it differs)")
    verify.add_argument("merged", type=Path, help="the merged checkpoint, e.g. DIR/merged")
    _inputs(verify, required=True)
    _base(verify)
    _common(verify)
    push = sub.add_parser("push", help="upload a GPTQ (or merged) checkpoint to the Hugging Face hub")
    push.add_argument("directory", type=Path, help="DIR/gptq or DIR/merged")
    push.add_argument("repo_id", help="hub repository, e.g. my-org/model-GPTQ")
    push.add_argument("--private", action="store_true", help="create the repository private")
    _common(push)
    comp = sub.add_parser("compare", help="candidates of several reports side by side, differences against the first tested for significance")
    comp.add_argument("reports", nargs="+", type=Path, help="report.json files (schema 2); the first is the baseline")
    comp.add_argument("--html", type=Path, help="also write the comparison as a self-contained HTML page here")
    comp.add_argument("--json", action="store_true", help="print the comparison as one JSON line instead of the markdown table")
    comp.add_argument("--verbose", action="store_true")
    return parser


def _stage_commands(sub) -> None:
    """`run` one stage at a time: the same options where they apply, the same outputs and manifests."""
    merge = sub.add_parser("merge", help="run's merge stage: base + adapter → DIR/merged, verified against PEFT's own merge")
    _inputs(merge)
    _output(merge, "writes DIR/merged and DIR/manifests/merged.json, as qmerge run does")
    _base(merge)
    _merged(merge)
    merge.add_argument("--verify", action=B, help="check the merge against PEFT's own merge and logits (default on, as in run)")
    _common(merge)
    quantize = sub.add_parser("quantize", help="run's GPTQ stage: DIR/merged → DIR/gptq (needs neither base nor adapter)")
    quantize.add_argument("--merged", type=Path, help="the merged checkpoint to quantize (default DIR/merged)")
    _output(quantize, "writes DIR/gptq and DIR/manifests/gptq.json, as qmerge run does")
    _gptq(quantize)
    _calibration(quantize)
    quantize.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    quantize.add_argument("--trust-remote-code", action=B, help="run a model's own code from its repository (off by default)")
    _common(quantize)
    evaluate = sub.add_parser("eval", help="run's drift stage and report: DIR/merged, DIR/gptq (those present) and --checkpoint ones against the model as trained")
    _inputs(evaluate)
    _output(evaluate, "reads DIR/merged, DIR/gptq; writes DIR/drift, DIR/report.json, .md, .html, as qmerge run does")
    _gptq(evaluate)
    _calibration(evaluate)
    _evaluation(evaluate)
    _base(evaluate)
    _merged(evaluate)
    evaluate.add_argument("--skip-gptq", action=B, help="leave out DIR/gptq and the rows on its grid")
    _common(evaluate)
