"""Command line: parse arguments, run, print errors. Bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from qmerge.errors import QmergeError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new run has finished")
    p.add_argument("--bits", type=int, default=4, help="GPTQ bits: 2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="GPTQ group size, -1 for per channel (default 128)")
    p.add_argument("--act-order", action="store_true", help="GPTQ desc_act (act-order); off in the portable profile")
    p.add_argument("--asym", action="store_true", help="asymmetric GPTQ (vLLM's Marlin path needs sym; default sym)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening fraction (default 0.01)")
    p.add_argument("--calibration", default="stdlib", help="calibration source: stdlib, wikitext2, hf:NAME[:CONFIG]:SPLIT[:FIELD], or a .txt/.jsonl file or folder")
    p.add_argument("--calibration-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--eval", default="stdlib", help="eval source, same forms as --calibration (default: stdlib eval part)")
    p.add_argument("--eval-samples", type=int, default=32, help="eval windows (default 32)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--quant-type", default="nf4", help="training-time bnb_4bit_quant_type (default nf4)")
    p.add_argument("--no-double-quant", action="store_true", help="training used bnb_4bit_use_double_quant=False")
    p.add_argument("--nf4-blocksize", type=int, default=64, help="training-time bitsandbytes blocksize (default 64)")
    p.add_argument("--compute-dtype", default="bfloat16", help="training-time bnb_4bit_compute_dtype (default bfloat16)")
    p.add_argument("--quant-storage", default="uint8", help="training-time bnb_4bit_quant_storage (default uint8)")
    p.add_argument("--skip-modules", default="", help="comma-separated llm_int8_skip_modules of the training load")
    p.add_argument("--merged-dtype", default="bfloat16", help="dtype of DIR/merged (default bfloat16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-gptq", action="store_true", help="stop after the merge (drift of the merged model only)")
    p.add_argument("--verbose", action="store_true", help="show library logs (transformers, GPTQModel)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmerge", description="QLoRA adapter → NF4-faithful merge → GPTQ checkpoint → drift report")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="merge, quantize and measure a base + QLoRA adapter")
    run.add_argument("--base", required=True, help="base model: local HF directory or hub id (bf16/fp16 safetensors)")
    run.add_argument("--adapter", required=True, help="QLoRA adapter: local PEFT directory or hub id")
    _add_common(run)
    demo = sub.add_parser("demo", help="the whole pipeline offline on the embedded SmolLM2-135M-Instruct")
    _add_common(demo)
    demo.set_defaults(group_size=64, calibration_samples=64, eval_samples=24)
    return parser


def settings_from(args: argparse.Namespace, base: str, adapter: str):
    from qmerge.settings import DataSettings, GPTQSettings, NF4Settings, RunSettings

    return RunSettings(
        base=base,
        adapter=adapter,
        out=args.out,
        nf4=NF4Settings(
            quant_type=args.quant_type,
            double_quant=not args.no_double_quant,
            blocksize=args.nf4_blocksize,
            compute_dtype=args.compute_dtype,
            quant_storage=args.quant_storage,
            skip_modules=tuple(s for s in args.skip_modules.split(",") if s),
        ),
        gptq=GPTQSettings(bits=args.bits, group_size=args.group_size, desc_act=args.act_order, sym=not args.asym, damp=args.damp),
        data=DataSettings(
            calibration=args.calibration,
            calibration_samples=args.calibration_samples,
            eval=args.eval,
            eval_samples=args.eval_samples,
            seq_len=args.seq_len,
        ),
        merged_dtype=args.merged_dtype,
        device=args.device,
        seed=args.seed,
        overwrite=args.overwrite,
        skip_gptq=args.skip_gptq,
    )


def _quiet_libraries() -> None:
    """Quiet by default: library warnings and info logs only with --verbose."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    try:
        from qmerge import pipeline

        if args.command == "demo":
            from qmerge import demo

            base, adapter = demo.prepare_inputs(echo=True)
            pipeline.run(settings_from(args, str(base), str(adapter)), verbose=args.verbose)
        else:
            pipeline.run(settings_from(args, args.base, args.adapter), verbose=args.verbose)
    except QmergeError as e:
        print(f"qmerge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qmerge: interrupted; no output was left behind", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
