"""Peak RSS and wall time of the merge stage against model size: qmerge's streaming merge next to
PEFT's merge_and_unload + save_pretrained on a bf16 base and on a 4-bit (bnb NF4) base.

    python scripts/bench_merge.py --series depth,size --reps 2 --write
    python scripts/bench_merge.py --series tiny --reps 1          # a smoke run in seconds

Random-weight Llama checkpoints (bf16 safetensors, seeded, made tensor by tensor on disk, never
downloaded) with a PEFT LoRA adapter (r 16, all-linear). Every merge runs in a fresh child process
(peak RSS from its rusage); tools alternate within each repetition and the medians are reported.
`--out-of-core` also merges the largest model inside a memory cgroup whose limit is below the
model's size on disk, and checks the output is byte-identical to the unlimited merge.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

TOOLS = ("qmerge", "peft-bf16", "peft-nf4")
# vocab 32000 (Llama 2); heads of 64 dims, grouped-query attention 4:1 like Llama 3
WIDTH = {
    512: dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2),
    1024: dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4),
    1536: dict(hidden_size=1536, intermediate_size=4096, num_attention_heads=24, num_key_value_heads=6),
    2048: dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=8),
}
SERIES = {
    "tiny": [(256, 2)],
    "depth": [(512, n) for n in (8, 16, 32, 64)],
    "size": [(512, 8), (1024, 12), (1536, 16), (2048, 28)],
    "1.5B": [(2048, 32)],
}
WIDTH[256] = dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=1)


def config(width: int, layers: int) -> dict:
    return dict(vocab_size=32000, num_hidden_layers=layers, max_position_embeddings=2048, tie_word_embeddings=False, **WIDTH[width])


# --- the child: one merge, reported as one JSON line ---------------------------------------------

def child(tool: str, base: Path, adapter: Path, out: Path) -> None:
    import torch

    start = time.perf_counter()
    if tool == "qmerge":
        from qmerge import merge_adapter

        merge_adapter(str(base), str(adapter), out, merge_into="nf4", device="cpu", verify=False)
    elif tool == "imports":
        import peft  # noqa: F401
        import transformers  # noqa: F401

        import qmerge.merge.streaming  # noqa: F401
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from qmerge.merge.nf4 import bnb_config
        from qmerge.settings import NF4Settings

        quant = {"quantization_config": bnb_config(NF4Settings())} if tool == "peft-nf4" else {}
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, **quant)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)
    benchlib.report({"stage_s": round(time.perf_counter() - start, 2)})


# --- the parent ----------------------------------------------------------------------------------

def measure(tool: str, base: Path, adapter: Path, out: Path, cgroup: Path | None = None) -> benchlib.Measured:
    shutil.rmtree(out, ignore_errors=True)
    return benchlib.run_child([*benchlib.python(), __file__, "child", tool, str(base), str(adapter), str(out)], cgroup=cgroup)


def bench_model(width: int, layers: int, tools: list[str], reps: int, work: Path, out_of_core: bool) -> list[dict]:
    base, adapter, out = work / "base", work / "adapter", work / "out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    params = benchlib.make_random_model(base, config(width, layers), adapter)
    disk = benchlib.dir_bytes(base)
    runs: dict[str, list[benchlib.Measured]] = {t: [] for t in tools}
    digest = None
    for rep in range(reps):
        for tool in tools[rep % len(tools):] + tools[: rep % len(tools)]:  # rotate the order each repetition
            m = measure(tool, base, adapter, out)
            runs[tool].append(m)
            print(f"  {width}x{layers} {tool}: stage {m.result.get('stage_s')} s, process {m.wall_s} s, peak RSS {m.peak_rss_mb:.0f} MB", flush=True)
            if tool == "qmerge" and out_of_core and digest is None:
                digest = benchlib.tree_digest(out)
    rows = [dict(model=f"h{width} × {layers}L", params=params, disk=disk, tool=t, runs=runs[t]) for t in tools]
    if out_of_core:
        rows.append(out_of_core_run(base, adapter, out, disk, digest))
    shutil.rmtree(work, ignore_errors=True)
    return rows


def out_of_core_run(base: Path, adapter: Path, out: Path, disk: int, digest: str) -> dict:
    """qmerge inside a memory cgroup limited to well under the model's size (page cache included)."""
    limit = int(disk * 0.4)
    with benchlib.memory_limited(limit) as (cgroup, stats):
        m = measure("qmerge", base, adapter, out, cgroup)
    same = benchlib.tree_digest(out) == digest
    print(f"  out of core: limit {limit / 2**20:.0f} MiB < model {disk / 2**20:.0f} MiB: {m.wall_s} s, {stats}, identical to the unlimited merge: {same}", flush=True)
    return dict(model="out of core", disk=disk, limit=limit, stats=stats, identical=same, runs=[m], tool="qmerge (cgroup)", params=0)


def table(rows: list[dict]) -> str:
    peft = {(r["model"], r["tool"]): benchlib.median([m.peak_rss_mb for m in r["runs"]]) for r in rows}
    out = []
    for r in rows:
        if r["model"] == "out of core":
            continue
        rss = benchlib.median([m.peak_rss_mb for m in r["runs"]])
        ratio = " / ".join(f"{rss / peft[(r['model'], t)]:.2f}" for t in ("peft-bf16", "peft-nf4") if (r["model"], t) in peft) if r["tool"] == "qmerge" else ""
        out.append([
            r["model"], f"{r['params'] / 1e6:.0f}M", f"{r['disk'] / 1e9:.2f}", r["tool"],
            f"{benchlib.median([m.result['stage_s'] for m in r['runs']]):.1f}",
            f"{benchlib.median([m.wall_s for m in r['runs']]):.1f}", f"{rss:.0f}", ratio, len(r["runs"]),
        ])
    return benchlib.markdown_table(
        ["model", "params", "GB on disk", "tool", "merge stage s (median)", "process s", "peak RSS MB (median)", "qmerge RSS / PEFT bf16 / PEFT nf4", "reps"], out
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", default="depth,size", help=f"comma-separated: {', '.join(SERIES)}")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qmerge-bench-merge"))
    ap.add_argument("--out-of-core", action="store_true", help="also merge the largest model under a cgroup memory limit below its size")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    tools = args.tools.split(",")
    sections = []
    with benchlib.LoadSampler() as load:
        floor = benchlib.run_child([*benchlib.python(), __file__, "child", "imports", "-", "-", "-"])
        print(f"interpreter + imports alone: peak RSS {floor.peak_rss_mb:.0f} MB", flush=True)
        ooc = []
        for series in args.series.split(","):
            rows = []
            models = SERIES[series]
            for i, (width, layers) in enumerate(models):
                last = args.out_of_core and series == args.series.split(",")[-1] and i == len(models) - 1
                rows += bench_model(width, layers, tools, args.reps, args.work, last)
            ooc += [r for r in rows if r["model"] == "out of core"]
            sections.append(table(rows))
            print(sections[-1], flush=True)
    text = "\n\n".join([
        f"Machine: {benchlib.machine()}. {load.summary()}; the 2 cores are shared with four other engineers' "
        f"work, so wall times carry that noise (peak RSS does not). A bare interpreter with torch, transformers, "
        f"peft and qmerge imported peaks at {floor.peak_rss_mb:.0f} MB; every row includes it.",
        *sections,
        *[out_of_core_text(r) for r in ooc],
    ])
    if args.write:
        name = "-".join(args.series.split(","))
        benchlib.write_section(f"bench_merge-{name}", f"### Merge stage, {args.series} series (`scripts/bench_merge.py --series {args.series} --reps {args.reps}`)\n\n{text}")


def out_of_core_text(r: dict) -> str:
    m, s = r["runs"][0], r["stats"]
    return (
        f"Out of core: the largest model ({r['disk'] / 2**30:.2f} GiB on disk) merged by qmerge inside a memory cgroup limited to "
        f"{s['limit_mb']:.0f} MiB (page cache counted): {m.wall_s:.0f} s, cgroup peak usage {s['max_usage_mb']:.0f} MiB, "
        f"{s['failcnt']} limit hits (page cache reclaimed), {s['oom_kill']} OOM kills; output byte-identical to the unlimited merge: {r['identical']}."
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
    else:
        main()
