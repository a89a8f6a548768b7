"""The CPU NF4 round trip before and after qmerge.merge.nf4_cpu, alone and inside the merge stage.

    python scripts/bench_nf4.py --reps 2 --write

Inputs: the cached demo (SmolLM2-135M-Instruct bf16 + its adapter) and the 203M scaling point of
bench_pipeline.py (a random-weight Llama 8x1024x2816, SmolLM2's vocabulary, random r=16 LoRA).
Each measurement runs in a fresh process, the variants alternating within each repetition:
  usual     the usual fp16 merge (bench_pipeline.py's step: PEFT merge_and_unload + save_pretrained)
  before    qmerge's merge stage (the merge, then verify as `qmerge run` runs it) with the round trip
            on bitsandbytes' own CPU quantize_4bit/dequantize_4bit, as it was
  after     the same with qmerge.merge.nf4_cpu
Stage times exclude the imports (torch, transformers, PEFT, bitsandbytes, GPTQModel); the usual
merge's process time includes them, as bench_pipeline.py reports it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipeline  # noqa: E402
import benchlib  # noqa: E402

SCALING_POINT = "8x1024x2816"


def stage_child(variant: str, base: str, adapter: str, out: str) -> None:
    """qmerge's merge stage with the round trip of `variant`, timing the round trips inside it."""
    import torch

    from qmerge import api
    from qmerge.merge import nf4, source
    from qmerge.models.engine import gptqmodel

    gptqmodel()  # verify's PEFT imports it: an import, not part of the stage's work
    exact = nf4.round_trip if variant == "after" else lambda w, s, d: nf4._bitsandbytes_round_trip(w.to(device=d, dtype=torch.float32), s)
    spent = {"s": 0.0, "weights": 0}

    def timed(weight, settings, device):
        start = time.perf_counter()
        result = exact(weight, settings, device)
        spent["s"] += time.perf_counter() - start
        spent["weights"] += weight.numel()
        return result

    source.round_trip = timed
    start = time.perf_counter()
    api.merge_adapter(base, adapter, out, device="cpu")
    merged = time.perf_counter()
    check = api.verify(out, base, adapter, device="cpu")
    assert check.ok, check.line()
    benchlib.report({"merge_s": merged - start, "verify_s": time.perf_counter() - merged, "round_trip_s": spent["s"], "weights": spent["weights"]})


def measure(base: Path, adapter: Path, work: Path, reps: int, env: dict) -> dict[str, list[benchlib.Measured]]:
    runs: dict[str, list[benchlib.Measured]] = {"usual": [], "before": [], "after": []}
    usual_args = dict(base=str(base), adapter=str(adapter), device="cpu", out=str(work / "usual"))
    for rep in range(reps):
        order = ("usual", "before", "after") if rep % 2 == 0 else ("after", "before", "usual")
        for variant in order:
            if variant == "usual":
                argv = [*benchlib.python(), bench_pipeline.__file__, "child", "merge", json.dumps(usual_args)]
            else:
                argv = [*benchlib.python(), __file__, "stage", variant, str(base), str(adapter), str(work / variant)]
            runs[variant].append(benchlib.run_child(argv, env=env))
            shutil.rmtree(work / variant, ignore_errors=True)
            print(f"rep {rep} {variant}: {runs[variant][-1].wall_s:.1f} s {runs[variant][-1].result}", flush=True)
    return runs


def rows(name: str, runs: dict[str, list[benchlib.Measured]]) -> list[list[str]]:
    med = benchlib.median
    usual = med([m.wall_s for m in runs["usual"]])
    out = [[name, "usual fp16 merge (process, imports included)", f"{usual:.1f}", "-", "-", "1"]]
    for variant, words in (("before", "qmerge merge stage, bitsandbytes round trip"), ("after", "qmerge merge stage, nf4_cpu round trip")):
        r = [m.result for m in runs[variant]]
        merge, verify, trip = med([x["merge_s"] for x in r]), med([x["verify_s"] for x in r]), med([x["round_trip_s"] for x in r])
        rate = r[0]["weights"] / trip / 1e6
        out.append([name, words, f"{merge + verify:.1f} ({merge:.1f} + verify {verify:.1f})", f"{trip:.1f}", f"{rate:.0f}", f"{(merge + verify) / usual:.2f}"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qmerge-bench-nf4"))
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every child (on a shared machine, 1 keeps the comparison fair)")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    demo_base, demo_adapter = bench_pipeline._demo_inputs()
    random_base, random_adapter, _ = bench_pipeline._random_inputs(SCALING_POINT, demo_base, args.work)
    table = []
    with benchlib.LoadSampler() as load:
        for name, base, adapter in (("demo (SmolLM2-135M)", demo_base, demo_adapter), (f"random {SCALING_POINT} (203M)", random_base, random_adapter)):
            table += rows(name, measure(base, adapter, args.work, args.reps, env))
    shutil.rmtree(args.work, ignore_errors=True)
    header = ["model", "what", "stage s (median)", "round trip s", "M weights/s", "/ usual"]
    text = (
        f"Machine: {benchlib.machine()}. {load.summary()}; the cores are shared with other engineers' work, so wall times "
        f"carry that noise. {args.reps} repetitions alternating the order, medians; stage times after imports"
        f"{f'; every process on {args.threads} thread(s) (OMP_NUM_THREADS)' if args.threads else ''}.\n\n"
        f"{benchlib.markdown_table(header, table)}"
    )
    print(text)
    if args.write:
        benchlib.write_section("bench_nf4", f"### The CPU NF4 round trip in the merge stage (`scripts/bench_nf4.py`)\n\n{text}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "stage":
        stage_child(*sys.argv[2:6])
    else:
        main()
