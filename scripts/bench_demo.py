"""`qmerge demo` from an empty cache, on this CPU or as an AVX2-only CPU, and the noise floor's cost.

    python scripts/bench_demo.py --write              # this CPU as it is
    python scripts/bench_demo.py --avx2 --write       # as a CPU without native bf16
    python scripts/bench_demo.py --cpu-time --write   # CPU seconds of a fine-tune step and a forward, both CPU kinds

--avx2 sets ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2 (torch then has no native bf16,
and its kernels are the AVX2 ones) and QMERGE_EMULATE_BF16=1 (qmerge's own switch; bitsandbytes
reads cpuid and ignores the other two). The demo runs once in a fresh QMERGE_CACHE, so it converts
the GGUF base, parses the corpus and fine-tunes the demo adapter before the run; every "[qmerge]"
line it prints is timestamped to split the phases, and the stages come from report.json. Then a
child with the same environment times, on the demo's reference, one float32 forward of a 512-token
window against the noise floor's forward (native bf16, or its float32 emulation), median of 4 after
a warm-up.

--cpu-time measures what wall time on a shared machine cannot: the CPU seconds (process time, one
thread, OMP_NUM_THREADS=1) of one demo fine-tune step in bf16 and in float32, and of the reference's
forward in float32 and in bf16 (the noise floor), on this CPU and as an AVX2-only one.
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
CACHE = str(Path.home() / ".cache" / "qmerge")  # --cpu-time reads the demo's cached base and adapter


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
    clock = time.process_time if os.environ.get("OMP_NUM_THREADS") == "1" else time.perf_counter  # one thread: CPU seconds, steady under load
    with torch.inference_mode():
        for i, window in enumerate(windows):
            ids = window[None, :-1]
            for kind in ("float32", "floor"):
                start = clock()
                if kind == "floor":
                    with computing_in(reference, torch.bfloat16):
                        reference(input_ids=ids, output_hidden_states=True)
                else:
                    reference(input_ids=ids, output_hidden_states=True)
                if i:  # the first window warms up
                    times[kind].append(clock() - start)
    benchlib.report({k: statistics.median(v) for k, v in times.items()} | {"arithmetic": describe(torch.bfloat16, torch.device("cpu"))})


def steps_child(cache: str, dtype: str) -> None:
    """CPU seconds of demo fine-tune steps (batch 4 × 256, QLoRA on the NF4 base) computing in `dtype`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qmerge import demo
    from qmerge.merge.nf4 import bnb_config
    from qmerge.settings import NF4Settings

    os.environ["QMERGE_CACHE"] = cache
    base, _ = demo.prepare_inputs(echo=False)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype), quantization_config=bnb_config(NF4Settings(compute_dtype=dtype)))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    batch = torch.randint(0, 49152, (demo.TRAIN["batch"], demo.TRAIN["seq_len"]), generator=torch.Generator().manual_seed(0))
    seconds = []
    for _ in range(2 if dtype == "float32" else 1):
        start = time.process_time()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.process_time() - start)
    benchlib.report({"step_cpu_s": min(seconds)})


def cpu_time(write: bool) -> None:
    """--cpu-time: one thread, process time, both CPU kinds."""
    rows = []
    with benchlib.LoadSampler() as load:
        for kind, env in (("this CPU (native bf16)", {}), ("as AVX2-only (emulated)", AVX2)):
            env = {**env, "OMP_NUM_THREADS": "1"}
            steps = {d: benchlib.run_child([*benchlib.python(), __file__, "steps", CACHE, d], env=env).result["step_cpu_s"] for d in ("float32", "bfloat16")}
            floor = benchlib.run_child([*benchlib.python(), __file__, "floor", CACHE], env=env).result
            rows.append([kind, f"{steps['bfloat16']:.1f}", f"{steps['float32']:.1f}", f"{floor['float32']:.2f}", f"{floor['floor']:.2f} ({floor['arithmetic']})", f"{floor['floor'] / floor['float32']:.2f}"])
            print(rows[-1], flush=True)
    header = ["CPU", "fine-tune step, bf16 (CPU s)", "fine-tune step, float32 (CPU s)", "reference forward, float32 (CPU s)", "noise-floor forward, bf16 (CPU s)", "floor / float32"]
    text = (f"Machine: {benchlib.machine()}. {load.summary()}. One thread (OMP_NUM_THREADS=1), process time, the demo's "
            f"cached base and adapter; a fine-tune step is batch 4 × 256 tokens (the demo trains 40), a forward one 512-token window.\n\n"
            f"{benchlib.markdown_table(header, rows)}")
    print(text)
    if write:
        benchlib.write_section("bench_demo-cpu-time", f"### CPU seconds of the demo's steps on both kinds of CPU (`scripts/bench_demo.py --cpu-time`)\n\n{text}")


def run_demo(env: dict, cache: Path, out: Path) -> tuple[dict, float, float]:
    """The demo command, each stdout line timestamped: {phase: seconds}, the whole wall time and the
    process's CPU seconds (user + system)."""
    argv = [*benchlib.python(), "-m", "qmerge.cli", "demo", "--out", str(out)]
    start = time.perf_counter()
    marks: list[tuple[float, str]] = []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=benchlib.REPO,
                            env={**os.environ, **env, "QMERGE_CACHE": str(cache)})
    for line in proc.stdout:
        if line.startswith("[qmerge]"):
            marks.append((time.perf_counter() - start, line.strip()))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"qmerge demo exited {proc.returncode}: {marks[-3:]}")
    at = lambda words: next(t for t, line in marks if words in line)  # noqa: E731
    after = lambda t0: next(t for t, _ in marks if t > t0)  # noqa: E731
    base, adapter = at("demo base"), at("demo adapter")
    phases = {"GGUF → bf16 base": adapter - base, "demo fine-tune (40 steps, its 4-bit load and corpus)": after(adapter) - adapter}
    report = json.loads((out / "report.json").read_text())
    phases.update({f"stage {name}": s["wall_s"] for name, s in report["stages"].items()})
    return {**phases, "_floor": next((c for c in report["candidates"].values() if c["kind"] == "noise-floor"), None)}, wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--avx2", action="store_true", help="as an AVX2-only CPU (see the module docstring)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the demo (1: its wall time is one core's, whatever else runs)")
    ap.add_argument("--cpu-time", action="store_true", help="CPU seconds of a fine-tune step and a forward instead (see the module docstring)")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    if args.cpu_time:
        return cpu_time(args.write)
    env = {**(AVX2 if args.avx2 else {}), **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    with tempfile.TemporaryDirectory(prefix="qmerge-bench-demo-") as tmp, benchlib.LoadSampler() as load:
        phases, wall, cpu = run_demo(env, Path(tmp) / "cache", Path(tmp) / "out")
        floor = benchlib.run_child([*benchlib.python(), __file__, "floor", str(Path(tmp) / "cache")], env=env).result
    row = phases.pop("_floor")
    rows = [[k, f"{v:.0f}"] for k, v in phases.items()] + [["**whole command, empty cache**", f"**{wall:.0f}** ({cpu:.0f} CPU s)"]]
    kind = ("as an AVX2-only CPU (`--avx2`)" if args.avx2 else "this CPU as it is") + (f", {args.threads} thread(s)" if args.threads else "")
    floor_row = (f"noise-floor row in the report: compute dtype {row['compute_dtype']}, {row['arithmetic']}" if row
                 else "no noise-floor row in the report (the adapter trained in float32)")
    text = (
        f"Machine: {benchlib.machine()}; {kind}. {load.summary()}; the cores are shared with other engineers' work, so wall "
        f"times carry that noise. `qmerge demo --out OUT` with its defaults in a fresh QMERGE_CACHE; {floor_row}.\n\n"
        f"{benchlib.markdown_table(['phase', 'wall s'], rows)}\n\n"
        f"Noise floor on the demo's reference, one 512-token window (median of 4{', CPU seconds' if args.threads == 1 else ''}): float32 forward {floor['float32']:.2f} s, "
        f"bf16 forward ({floor['arithmetic']}) {floor['floor']:.2f} s: **{floor['floor'] / floor['float32']:.2f}×**."
    )
    print(text)
    if args.write:
        flags = (" --avx2" if args.avx2 else "") + (f" --threads {args.threads}" if args.threads else "")
        benchlib.write_section(f"bench_demo-{'avx2' if args.avx2 else 'native'}{f'-t{args.threads}' if args.threads else ''}",
                               f"### `qmerge demo` from an empty cache, {kind} (`scripts/bench_demo.py{flags}`)\n\n{text}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "floor":
        floor_child(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "steps":
        steps_child(sys.argv[2], sys.argv[3])
    else:
        main()
