"""Command line: parse arguments (and a recipe), call the API, print errors.

Exit status: 0 ok; 1 internal error; 2 bad input (one line naming cause and fix, nothing left
behind); 3 a quality budget (--max-kld, --max-ppl-ratio) failed on the final checkpoint, whose
outputs are kept for inspection; 4 verification failed (`qmerge verify`, or the check inside `qmerge
run`): the merged weights differ from an independent recomputation beyond rounding, one line names
the worst module and its errors.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from qmerge.errors import QmergeError, VerifyError

# A process that had not imported torch before this module (the qmerge command, python -m qmerge.cli)
# has computed nothing yet: it can stay single-threaded and fork a worker per stage (io.isolated).
FRESH_PROCESS = "torch" not in sys.modules

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_BUDGET, EXIT_VERIFY_FAILED = 0, 1, 2, 3, 4


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Every option is also a recipe key (dashes or underscores); None means 'not given here'."""
    B = argparse.BooleanOptionalAction
    p.add_argument("--recipe", type=Path, help="YAML or TOML file of settings; flags given here override it")
    p.add_argument("--out", help="output directory (must not exist or be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out, replacing each stage's output as the stage finishes")
    p.add_argument("--resume", action="store_true", help="continue a run in --out: reuse every finished stage whose manifest verifies")
    p.add_argument("--verify-inputs", action=argparse.BooleanOptionalAction, help="hash every input and stage file again (default: reuse a file's hash while its size and modification time are unchanged)")
    p.add_argument("--bits", type=int, help="GPTQ bits: 2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, help="GPTQ group size, -1 for per channel (default 128)")
    p.add_argument("--act-order", action=B, help="GPTQ desc_act; off in the portable profile")
    p.add_argument("--sym", action=B, help="symmetric GPTQ (default; vLLM's Marlin path needs it)")
    p.add_argument("--damp", type=float, help="GPTQ dampening fraction (default 0.01)")
    p.add_argument("--target", help="server the checkpoint must load in: any (default), transformers, vllm, sglang; refused up front if it cannot")
    p.add_argument("--calibration", help="calibration source: stdlib, wikitext2, hf:NAME[:CONFIG]:SPLIT[:FIELD], or a .txt/.jsonl file or folder")
    p.add_argument("--calibration-samples", type=int, help="calibration windows (default 128)")
    p.add_argument("--eval", help="eval sources, comma-separated, same forms as --calibration (default: stdlib eval part); metrics per set")
    p.add_argument("--eval-samples", type=int, help="eval windows (default 32)")
    p.add_argument("--seq-len", type=int, help="tokens per window (default 512)")
    p.add_argument("--eval-batch", type=int, help="eval windows per forward in the drift stage (default 0: 1 on CPU, on a GPU the most its free memory holds, up to 16)")
    p.add_argument("--stream", help="hold verify's and drift's 16-bit candidates a layer at a time: auto (default: when the memory plan says they do not fit beside the reference), always, never")
    p.add_argument("--allow-overlap", action=B, help="evaluate even on windows that are also in the calibration set (the overlapping fraction is reported)")
    _add_base_options(p)
    p.add_argument("--merged-dtype", help="dtype of DIR/merged (default bfloat16)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--skip-gptq", action=B, help="stop after the merge (drift of the merged model only)")
    p.add_argument("--allow-pickle", action=B, help="read pickled .bin weights (they run code when loaded: trusted files only)")
    p.add_argument(
        "--candidates",
        help="report rows, comma-separated: merged, original, peft-nf4, rtn, gptq, gptq-original, base (default: all but gptq-original)",
    )
    p.add_argument("--max-kld", type=float, help="budget: fail with exit 3 if the final checkpoint's mean KLD exceeds this")
    p.add_argument("--max-ppl-ratio", type=float, help="budget: fail with exit 3 if the final checkpoint's PPL ratio exceeds this")
    p.add_argument("--json", action="store_true", help="print one JSON summary line on stdout, everything else on stderr")
    p.add_argument("--verbose", action="store_true", help="show library logs (transformers, GPTQModel) and tracebacks")


def _add_base_options(p: argparse.ArgumentParser) -> None:
    """How the adapter saw the base: shared by run/demo and verify (a pre-quantized base sets the 4-bit ones itself)."""
    B = argparse.BooleanOptionalAction
    p.add_argument("--merge-into", help="nf4 (default): the 4-bit weights a QLoRA adapter was trained on; original: the 16-bit weights (a plain LoRA)")
    p.add_argument("--quant-type", help="training-time bnb_4bit_quant_type (default nf4)")
    p.add_argument("--double-quant", action=B, help="training-time bnb_4bit_use_double_quant (default on)")
    p.add_argument("--nf4-blocksize", type=int, help="training-time bitsandbytes blocksize (default 64)")
    p.add_argument("--compute-dtype", help="training-time bnb_4bit_compute_dtype (default bfloat16)")
    p.add_argument("--quant-storage", help="training-time bnb_4bit_quant_storage (default uint8)")
    p.add_argument("--skip-modules", help="comma-separated llm_int8_skip_modules of the training load")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--trust-remote-code", action=B, help="run a model's own code from its repository (off by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmerge", description="QLoRA adapter → NF4-faithful merge → GPTQ checkpoint → drift report")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="merge, quantize and measure a base + QLoRA adapter")
    run.add_argument("--base", help="base model: local HF directory or hub id (bf16/fp16 safetensors)")
    run.add_argument("--adapter", action="append", help="QLoRA adapter: local PEFT directory or hub id, optionally DIR:WEIGHT; repeat it to merge a weighted sum of adapters")
    _add_run_options(run)
    demo = sub.add_parser("demo", help="the whole pipeline offline on the embedded SmolLM2-135M-Instruct")
    _add_run_options(demo)
    verify = sub.add_parser("verify", help="check DIR/merged against PEFT's own merge and the unmerged model's logits (exit 4 if it differs)")
    verify.add_argument("merged", type=Path, help="the merged checkpoint, e.g. DIR/merged")
    verify.add_argument("--base", required=True, help="the base it was merged from: local HF directory or hub id")
    verify.add_argument("--adapter", required=True, action="append", help="the adapter it was merged with: local PEFT directory or hub id, DIR:WEIGHT; repeated for a mix")
    _add_base_options(verify)
    verify.add_argument("--json", action="store_true", help="print the result as one JSON line on stdout")
    verify.add_argument("--verbose", action="store_true")
    push = sub.add_parser("push", help="upload a GPTQ (or merged) checkpoint to the Hugging Face hub")
    push.add_argument("directory", type=Path, help="DIR/gptq or DIR/merged")
    push.add_argument("repo_id", help="hub repository, e.g. my-org/model-GPTQ")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--verbose", action="store_true")
    push.add_argument("--json", action="store_true")
    comp = sub.add_parser("compare", help="candidates of several reports side by side, differences against the first tested for significance")
    comp.add_argument("reports", nargs="+", type=Path, help="report.json files (schema 2); the first is the baseline")
    comp.add_argument("--html", type=Path, help="also write the comparison as a self-contained HTML page here")
    comp.add_argument("--json", action="store_true", help="print the comparison as one JSON line instead of the markdown table")
    comp.add_argument("--verbose", action="store_true")
    return parser


DEMO_DEFAULTS = {"group_size": 64, "calibration_samples": 64, "eval_samples": 24}


def run_values(args: argparse.Namespace) -> dict:
    """Recipe values overridden by every flag given on the command line."""
    from qmerge import recipe

    values = recipe.load(args.recipe) if args.recipe else {}
    if args.command == "demo":
        values = {**DEMO_DEFAULTS, **values}
    given = recipe.split_lists({k: v for k, v in vars(args).items() if k in recipe.KEYS and v is not None})
    return {**values, **given}


def _quiet_libraries() -> None:
    """Quiet by default: library warnings, info logs and load bars only with --verbose."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _dispatch(args: argparse.Namespace) -> dict:
    if args.command == "compare":
        from qmerge.report import compare

        result = compare.run(args.reports, args.html)
        if not args.json:
            print(compare.markdown(result))
        return result
    from qmerge import api
    from qmerge.io import isolated

    if args.command == "verify":
        return _verify(args)
    if args.command == "push":
        url = api.push(args.directory, args.repo_id, private=args.private)
        print(f"[qmerge] pushed {args.directory} to {url}", file=sys.stderr)
        return {"pushed": str(args.directory), "url": url}
    values = run_values(args)
    workers = _workers()
    if args.command == "demo":
        from qmerge import demo

        prepare = functools.partial(demo.prepare_inputs, echo=True)  # the first time, a fine-tune: in a worker, with every thread
        base, adapter = isolated.run(prepare, "fork")[0] if isolated.can_fork() else prepare()
        values.update(base=str(base), adapter=str(adapter))
    result = api.run(overwrite=args.overwrite, resume=args.resume, verbose=args.verbose, progress=True, workers=workers, **values)
    return result.summary()


def _workers() -> str | None:
    """Stage workers for a fresh process (this one then computes single-threaded until it forks them)."""
    from qmerge.io import isolated

    if not FRESH_PROCESS:
        return None
    isolated.single_threaded_parent()
    return "auto"


def _verify(args: argparse.Namespace) -> dict:
    """The worst modules on stdout, the verdict as the summary; a failure raises VerifyError (exit 4)."""
    from qmerge import api, recipe
    from qmerge.eval.verify import raise_if_failed

    values = recipe.split_lists({k: v for k, v in vars(args).items() if k in recipe.KEYS and v is not None})
    result = api.verify(args.merged, **values)
    print("worst modules (error / rounding tolerance of the stored dtype):")
    for m in result.modules[:5]:
        print(f"  {m.key}: max abs err {m.max_abs_err:.3g}, max rel err {m.max_rel_err:.3g}, {m.of_tolerance:.3g} of tolerance")
    raise_if_failed(result)
    print(f"[qmerge] {result.line()}", file=sys.stderr)
    return result.summary()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose and args.command != "compare":  # compare loads no library to quiet
        _quiet_libraries()
    with _stdout_to_stderr(args.json):
        status, summary = _status_of(args)
    if args.json:
        print(json.dumps({"exit_status": status, **summary}), flush=True)
    return status


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool):
    """With --json the summary is alone on stdout: everything else goes to stderr, prints of
    libraries at file-descriptor level included. Restored afterwards (main may run inside another program)."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved_fd, saved_stream = os.dup(1), sys.stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stdout = saved_stream
        os.dup2(saved_fd, 1)
        os.close(saved_fd)


def _status_of(args: argparse.Namespace) -> tuple[int, dict]:
    """Run the command; every outcome becomes an exit status, a one-line message and a summary."""
    try:
        summary = _dispatch(args)
        if summary.get("budgets_ok") is False:
            failed = [f"{k} {b['value']:.4g} > {b['limit']:.4g}" for k, b in summary["budgets"].items() if not b["ok"]]
            print(f"qmerge: quality budget failed: {'; '.join(failed)}", file=sys.stderr)
            return EXIT_BUDGET, summary
        return EXIT_OK, summary
    except VerifyError as e:
        print(f"qmerge: {e}", file=sys.stderr)
        return EXIT_VERIFY_FAILED, {"error": str(e)}
    except QmergeError as e:
        print(f"qmerge: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT, {"error": str(e)}
    except KeyboardInterrupt:
        print("qmerge: interrupted; no output was left behind", file=sys.stderr)
        return 130, {"error": "interrupted"}
    except Exception as e:  # noqa: BLE001 - the one place internal errors become an exit status
        if args.verbose:
            raise
        print(f"qmerge: internal error: {type(e).__name__}: {e} (rerun with --verbose for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL, {"error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    sys.exit(main())
