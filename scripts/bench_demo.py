"""`qmerge demo` from an empty cache, on this CPU or as an AVX2-only CPU, and the noise floor's cost.

    python scripts/bench_demo.py --write           # this CPU as it is
    python scripts/bench_demo.py --avx2 --write    # as a CPU without native bf16

--avx2 sets ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2 (torch then has no native bf16,
and its kernels are the AVX2 ones) and QMERGE_EMULATE_BF16=1 (qmerge's own switch; bitsandbytes
reads cpuid and ignores the other two). The demo runs once in a fresh QMERGE_CACHE, so it converts
the GGUF base, parses the corpus and fine-tunes the demo adapter before the run; every "[qmerge]"
line it prints is timestamped to split the phases, and the stages come from report.json. Then a
child with the same environment times, on the demo's reference, one float32 forward of a 512-token
window against the noise floor's forward (native bf16, or its float32 emulation), median of 4 after
a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "QMERGE_EMULATE_BF16": "1"}


def floor_child(cache: str) -> None:
    """Float32 reference forward against the noise floor's forward, per 512-token window."""
    import statistics

    import torch
    from transformers import AutoTokenizer

    os.environ["QMERGE_CACHE"] = cache
    from qmerge import demo
    from qmerge.io import text
    from qmerge.merge.adapter import load_mix
    from qmerge.models.precision import computing_in, describe
    from qmerge.models.reference import load_reference
    from qmerge.settings import NF4Settings

    base, adapter = demo.prepare_inputs(echo=False)
    reference = load_reference(base, load_mix((str(adapter),)), NF4Settings(), torch.device("cpu"))
    windows = text.windows("stdlib", "eval", AutoTokenizer.from_pretrained(base), 512, 5)
    times: dict[str, list[float]] = {"float32": [], "floor": []}
    with torch.inference_mode():
        for i, window in enumerate(windows):
            ids = window[None, :-1]
            for kind in ("float32", "floor"):
                start = time.perf_counter()
                if kind == "floor":
                    with computing_in(reference, torch.bfloat16):
                        reference(input_ids=ids, output_hidden_states=True)
                else:
                    reference(input_ids=ids, output_hidden_states=True)
                if i:  # the first window warms up
                    times[kind].append(time.perf_counter() - start)
    benchlib.report({k: statistics.median(v) for k, v in times.items()} | {"arithmetic": describe(torch.bfloat16, torch.device("cpu"))})


def run_demo(env: dict, cache: Path, out: Path) -> tuple[dict, float]:
    """The demo command, each stdout line timestamped: {phase: seconds} and the whole wall time."""
    argv = [*benchlib.python(), "-m", "qmerge.cli", "demo", "--out", str(out)]
    start = time.perf_counter()
    marks: list[tuple[float, str]] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=benchlib.REPO,
                          env={**os.environ, **env, "QMERGE_CACHE": str(cache)}) as proc:
        for line in proc.stdout:
            if line.startswith("[qmerge]"):
                marks.append((time.perf_counter() - start, line.strip()))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"qmerge demo exited {proc.returncode}: {marks[-3:]}")
    at = lambda words: next(t for t, line in marks if words in line)  # noqa: E731
    after = lambda t0: next(t for t, _ in marks if t > t0)  # noqa: E731
    base, adapter = at("demo base"), at("demo adapter")
    phases = {"GGUF → bf16 base": adapter - base, "demo fine-tune (40 steps, its 4-bit load and corpus)": after(adapter) - adapter}
    report = json.loads((out / "report.json").read_text())
    phases.update({f"stage {name}": s["wall_s"] for name, s in report["stages"].items()})
    return {**phases, "_floor": next((c for c in report["candidates"].values() if c["kind"] == "noise-floor"), None)}, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--avx2", action="store_true", help="as an AVX2-only CPU (see the module docstring)")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    env = AVX2 if args.avx2 else {}
    with tempfile.TemporaryDirectory(prefix="qmerge-bench-demo-") as tmp, benchlib.LoadSampler() as load:
        phases, wall = run_demo(env, Path(tmp) / "cache", Path(tmp) / "out")
        floor = benchlib.run_child([*benchlib.python(), __file__, "floor", str(Path(tmp) / "cache")], env=env).result
    row = phases.pop("_floor")
    rows = [[k, f"{v:.0f}"] for k, v in phases.items()] + [["**whole command, empty cache**", f"**{wall:.0f}**"]]
    kind = "as an AVX2-only CPU (`--avx2`)" if args.avx2 else "this CPU as it is"
    floor_row = (f"noise-floor row in the report: compute dtype {row['compute_dtype']}, {row['arithmetic']}" if row
                 else "no noise-floor row in the report (the adapter trained in float32)")
    text = (
        f"Machine: {benchlib.machine()}; {kind}. {load.summary()}; the cores are shared with other engineers' work, so wall "
        f"times carry that noise. `qmerge demo --out OUT` with its defaults in a fresh QMERGE_CACHE; {floor_row}.\n\n"
        f"{benchlib.markdown_table(['phase', 'wall s'], rows)}\n\n"
        f"Noise floor on the demo's reference, one 512-token window (median of 4): float32 forward {floor['float32']:.2f} s, "
        f"bf16 forward ({floor['arithmetic']}) {floor['floor']:.2f} s: **{floor['floor'] / floor['float32']:.2f}×**."
    )
    print(text)
    if args.write:
        tag = "avx2" if args.avx2 else "native"
        benchlib.write_section(f"bench_demo-{tag}", f"### `qmerge demo` from an empty cache, {kind} (`scripts/bench_demo.py{' --avx2' if args.avx2 else ''}`)\n\n{text}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "floor":
        floor_child(sys.argv[2])
    else:
        main()
