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
import logging
import os
import sys
import warnings
from pathlib import Path

from qmerge.errors import QmergeError, VerifyError
from qmerge.options import build_parser

# A process that had not imported torch before this module (the qmerge command, python -m qmerge.cli)
# has computed nothing yet: it can stay single-threaded and fork a worker per stage (io.isolated).
FRESH_PROCESS = "torch" not in sys.modules

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_BUDGET, EXIT_VERIFY_FAILED = 0, 1, 2, 3, 4
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
    if args.command in ("merge", "quantize", "eval"):
        return _stage(args)
    values = run_values(args)
    workers = _workers()
    if args.command == "demo":
        from qmerge import demo

        prepare = functools.partial(demo.prepare_inputs, echo=not args.quiet)  # the first time, a fine-tune: in a worker, with every thread
        base, adapter = isolated.run(prepare, "fork")[0] if isolated.can_fork() else prepare()
        values = {**demo.recorded_settings(adapter), **values, "base": str(base), "adapter": str(adapter)}
    result = api.run(overwrite=args.overwrite, resume=args.resume, verbose=args.verbose, progress=not args.quiet, push_to=args.push_to, private=args.private,
                     workers=workers, **values)
    return result.summary()


def _workers() -> str | None:
    """Stage workers for a fresh process (this one then computes single-threaded until it forks them)."""
    from qmerge.io import isolated

    if not FRESH_PROCESS:
        return None
    isolated.single_threaded_parent()
    return "auto"


def _stage(args: argparse.Namespace) -> dict:
    """`qmerge merge|quantize|eval --out DIR`: the API's stage function on DIR/merged, DIR/gptq or DIR."""
    from qmerge import api, commands

    keys = {"merge": commands.MERGE_KEYS, "quantize": commands.QUANTIZE_KEYS, "eval": commands.EVAL_KEYS}[args.command]
    values = commands.only(run_values(args), keys)
    base, adapter, out = (values.pop(key, None) for key in ("base", "adapter", "out"))
    if not out:
        raise QmergeError(f"--out is required (or set 'out:' in the recipe): the run directory qmerge {args.command} reads and writes")
    out, flags = Path(out), dict(overwrite=args.overwrite, resume=args.resume, progress=not args.quiet)
    if args.command == "quantize":
        result = api.gptq_quantize(args.merged or out / "merged", out / "gptq", verbose=args.verbose, **flags, **values)
        _say(args, f"GPTQ checkpoint: {result.path}")
        return {"out": str(out), "gptq": str(result.path), "modules": len(result.log)}
    for key, value in (("base", base), ("adapter", adapter)):
        if not value:
            raise QmergeError(f"--{key} is required (or set '{key}:' in the recipe)")
    if args.command == "merge":
        merged = api.merge_adapter(base, adapter, out / "merged", verify=args.verify is not False, **flags, **values)
        _say(args, f"merged checkpoint: {merged}")
        return {"out": str(out), "merged": str(merged)}
    return api.evaluate(base, adapter, out, verbose=args.verbose, **flags, **values).summary()


def _say(args: argparse.Namespace, line: str) -> None:
    if not args.quiet:
        print(f"[qmerge] {line}", flush=True)


def _verify(args: argparse.Namespace) -> dict:
    """The worst modules on stdout, the verdict as the summary; a failure raises VerifyError (exit 4)."""
    from qmerge import api, recipe
    from qmerge.eval.verify import raise_if_failed

    values = recipe.split_lists({k: v for k, v in vars(args).items() if k in recipe.KEYS and v is not None})
    result = api.verify(args.merged, progress=not args.quiet, **values)
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
        from qmerge.report.files import dumps

        print(dumps({"exit_status": status, **summary}), flush=True)
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
            print(f"qmerge: quality budget failed: {'; '.join(failed)}" + (f"; {summary['search']}" if summary.get("search") else ""), file=sys.stderr)
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
