"""`qmerge run` against the usual workflow on the same inputs, alternating, several repetitions.

    python scripts/bench_pipeline.py --reps 2 --calibration-samples 16 --eval-samples 8 --write
    python scripts/bench_pipeline.py --random 16x1024x2816 --reps 1 --write   # scaling: a random-weight Llama

Inputs: the embedded demo (SmolLM2-135M-Instruct bf16 + the demo QLoRA adapter), or with --random
LAYERSxHIDDENxINTERMEDIATE a random-weight Llama of that shape (made on the fly, SmolLM2's tokenizer
and vocabulary, heads of 64) with a random r=16 all-linear LoRA adapter.

The usual workflow (the tutorial one), one process per step as a user runs it:
  merge      fp16 base + PeftModel.from_pretrained + merge_and_unload + save_pretrained
  gptq       GPTQModel load / quantize / save of that, same QuantizeConfig and calibration windows
  ppl ×3     a perplexity script per model on the same eval windows: the QLoRA model (bnb 4-bit base
             + adapter), the merged model, the GPTQ model
qmerge: `qmerge run --candidates merged,gptq` (reference, merged, GPTQ and the noise floor); with
--all-candidates also `qmerge run` with every default candidate. Plus a bare GPTQModel call on
qmerge's own merged model, which qmerge's GPTQ stage is compared with.
Every step runs in a fresh process (peak RSS from its rusage, see benchlib); perplexities are
computed in float32 as qmerge's drift stage computes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

USUAL = ("merge", "gptq", "ppl-qlora", "ppl-merged", "ppl-gptq")


# --- children: one step each, reported as one JSON line ------------------------------------------

def child(step: str, a: dict) -> None:
    import torch

    start = time.perf_counter()
    if step == "merge":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(a["base"], dtype=torch.float16, device_map={"": a["device"]})
        model = PeftModel.from_pretrained(model, a["adapter"]).merge_and_unload()
        model.save_pretrained(a["out"])
        AutoTokenizer.from_pretrained(a["base"]).save_pretrained(a["out"])
    elif step == "gptq":
        import qmerge  # noqa: F401  (sets GPTQMODEL_CPU_WORKERS, without which GPTQModel fails on 2 cores)
        from gptqmodel import GPTQModel, QuantizeConfig

        start = time.perf_counter()  # after the import, as in qmerge's GPTQ stage (its merge stage imported gptqmodel already)

        with tempfile.TemporaryDirectory() as scratch:
            os.chdir(scratch)  # GPTQModel writes ./logs and offloads into the working directory
            config = QuantizeConfig(bits=4, group_size=a["group_size"], desc_act=False, sym=True, damp_percent=0.01, format="gptq", offload_to_disk_path=f"{scratch}/offload")
            model = GPTQModel.load(a["model"], config, device=a["device"])
            model.quantize([{"input_ids": w, "attention_mask": [1] * len(w)} for w in _windows(a, "calibration")], batch_size=1)
            model.save(a["out"])
    else:
        model = _load_for_ppl(step, a)
        nll = []
        with torch.inference_mode():
            for w in _windows(a, "eval"):
                ids = torch.tensor([w], device=a["device"])
                nll.append(model(input_ids=ids, labels=ids).loss.item())
        a["ppl"] = round(torch.tensor(nll).mean().exp().item(), 4)
    benchlib.report({"stage_s": round(time.perf_counter() - start, 2), **({"ppl": a["ppl"]} if "ppl" in a else {}), **_gpu_peak(a["device"])})


def _windows(a: dict, role: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    from qmerge.io import text

    count = a["calibration_samples"] if role == "calibration" else a["eval_samples"]
    return text.windows("stdlib", role, AutoTokenizer.from_pretrained(a["base"]), a["seq_len"], count).tolist()


def _load_for_ppl(step: str, a: dict):
    import torch
    from transformers import AutoModelForCausalLM

    if step == "ppl-qlora":
        from peft import PeftModel

        from qmerge.merge.nf4 import bnb_config
        from qmerge.settings import NF4Settings

        model = AutoModelForCausalLM.from_pretrained(a["base"], dtype=torch.float32, quantization_config=bnb_config(NF4Settings(), "float32"), device_map={"": a["device"]})
        return PeftModel.from_pretrained(model, a["adapter"]).eval()
    path = a["merged"] if step == "ppl-merged" else a["gptq"]
    dtype = torch.float16 if step == "ppl-gptq" and a["device"].startswith("cuda") else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": a["device"]}).eval()


def _gpu_peak(device: str) -> dict:
    import torch

    return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20)} if device.startswith("cuda") else {}


# --- the parent (never imports torch: see benchlib) ----------------------------------------------

def run_step(step: str, args: dict) -> benchlib.Measured:
    return benchlib.run_child([*benchlib.python(), __file__, "child", step, json.dumps(args)])


def usual(a: dict, work: Path) -> dict:
    merged, gptq = work / "usual-merged", work / "usual-gptq"
    steps = {
        "merge": dict(a, out=str(merged)),
        "gptq": dict(a, model=str(merged), out=str(gptq)),
        **{s: dict(a, merged=str(merged), gptq=str(gptq)) for s in USUAL[2:]},
    }
    runs = {s: run_step(s, kw) for s, kw in steps.items()}
    size = benchlib.dir_bytes(merged) + benchlib.dir_bytes(gptq)
    shutil.rmtree(merged)
    shutil.rmtree(gptq)
    return dict(runs=runs, bytes=size)


def qmerge(a: dict, work: Path, candidates: str = "merged,gptq") -> dict:
    out = work / "qmerge-out"
    argv = [
        *benchlib.python(), "-m", "qmerge.cli", "run", "--base", a["base"], "--adapter", a["adapter"], "--out", str(out), "--device", a["device"],
        "--calibration", "stdlib", "--calibration-samples", str(a["calibration_samples"]), "--eval", "stdlib", "--eval-samples", str(a["eval_samples"]),
        "--seq-len", str(a["seq_len"]), "--group-size", str(a["group_size"]), *(["--candidates", candidates] if candidates else []),
        *(["--samples", str(a["samples"])] if a["samples"] is not None else []),
    ]
    m = benchlib.run_child(argv)
    stages = json.loads((out / "report.json").read_text())["stages"]
    bare = run_step("gptq", dict(a, model=str(out / "merged"), out=str(work / "bare-gptq"))) if candidates else None
    size = benchlib.dir_bytes(out / "merged") + benchlib.dir_bytes(out / "gptq")
    shutil.rmtree(out)
    shutil.rmtree(work / "bare-gptq", ignore_errors=True)
    return dict(run=m, stages=stages, bare=bare, bytes=size)


def qmerge_all(a: dict, work: Path) -> dict:
    """qmerge with every default candidate (merged, original, peft-nf4, rtn, gptq, base, noise floor)."""
    return qmerge(a, work, candidates="")


def all_candidates_line(usuals: list[dict], alls: list[dict]) -> str:
    med = benchlib.median
    u_total, u_rss = med([sum(m.wall_s for m in r["runs"].values()) for r in usuals]), med([max(m.peak_rss_mb for m in r["runs"].values()) for r in usuals])
    total, rss = med([q["run"].wall_s for q in alls]), med([q["run"].peak_rss_mb for q in alls])
    stages = ", ".join(f"{k} {med([q['stages'][k]['wall_s'] for q in alls]):.1f} s" for k in alls[0]["stages"])
    return (f"With every default candidate (merged, original, peft-nf4, rtn, gptq, base and the noise floor): total wall {total:.1f} s = "
            f"**{total / u_total:.2f}×** the usual workflow's three models, peak RSS {rss:.0f} MB = **{rss / u_rss:.2f}×** (stages: {stages}).")


def table(usuals: list[dict], qmerges: list[dict]) -> str:
    med = benchlib.median

    def step_s(runs: list[dict], s: str) -> float:
        return med([r["runs"][s].wall_s for r in runs])

    rows = []
    u_merge, q_merge = step_s(usuals, "merge"), med([sum(q["stages"][k]["wall_s"] for k in ("nf4", "merged") if k in q["stages"]) for q in qmerges])
    u_gptq, q_gptq = step_s(usuals, "gptq"), med([q["stages"]["gptq"]["wall_s"] for q in qmerges])
    u_ppl, q_drift = sum(step_s(usuals, s) for s in USUAL[2:]), med([q["stages"]["drift"]["wall_s"] for q in qmerges])
    u_total, q_total = med([sum(m.wall_s for m in r["runs"].values()) for r in usuals]), med([q["run"].wall_s for q in qmerges])
    u_rss, q_rss = med([max(m.peak_rss_mb for m in r["runs"].values()) for r in usuals]), med([q["run"].peak_rss_mb for q in qmerges])
    rows.append(["merge (usual: process incl. imports; qmerge: nf4 + merged stages, verification included)", f"{u_merge:.1f}", f"{q_merge:.1f}", f"{q_merge / u_merge:.2f}"])
    rows.append(["GPTQ", f"{u_gptq:.1f}", f"{q_gptq:.1f}", f"{q_gptq / u_gptq:.2f}"])
    rows.append(["perplexity ×3 (usual) / drift (qmerge)", f"{u_ppl:.1f}", f"{q_drift:.1f}", f"{q_drift / u_ppl:.2f}"])
    rows.append(["**total wall s**", f"{u_total:.1f}", f"{q_total:.1f}", f"**{q_total / u_total:.2f}**"])
    rows.append(["**peak RSS MB**", f"{u_rss:.0f}", f"{q_rss:.0f}", f"**{q_rss / u_rss:.2f}**"])
    gpu_u = [m.result.get("peak_gpu_mb") for r in usuals for m in r["runs"].values()]
    if any(gpu_u):
        q_gpu = med([max(s.get("peak_gpu_mb", 0) for s in q["stages"].values()) for q in qmerges])
        rows.append(["peak GPU MB", f"{max(filter(None, gpu_u))}", f"{q_gpu}", f"{q_gpu / max(filter(None, gpu_u)):.2f}"])
    u_bytes, q_bytes = usuals[0]["bytes"], qmerges[0]["bytes"]
    rows.append(["output bytes (merged + GPTQ)", f"{u_bytes / 1e6:.0f} MB", f"{q_bytes / 1e6:.0f} MB", f"{q_bytes / u_bytes:.2f}"])
    main = benchlib.markdown_table(["", "usual", "qmerge", "qmerge / usual"], rows)
    steps = benchlib.markdown_table(
        ["usual step", "process wall s (median)", "stage s after imports", "peak RSS MB"],
        [[s, f"{step_s(usuals, s):.1f}", f"{med([r['runs'][s].result['stage_s'] for r in usuals]):.1f}", f"{med([r['runs'][s].peak_rss_mb for r in usuals]):.0f}"] for s in USUAL],
    )
    bare = med([q["bare"].result["stage_s"] for q in qmerges if q["bare"]])
    overhead = f"qmerge's GPTQ stage {q_gptq:.1f} s against a bare GPTQModel load/quantize/save of the same merged model {bare:.1f} s (imports excluded from both): overhead {100 * (q_gptq / bare - 1):+.1f}%."
    per_rep = "; ".join(f"rep {i}: usual {sum(m.wall_s for m in u['runs'].values()):.0f} s, qmerge {q['run'].wall_s:.0f} s" for i, (u, q) in enumerate(zip(usuals, qmerges)))
    return f"{main}\n\n{steps}\n\n{overhead} Per repetition: {per_rep}."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--calibration-samples", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random", metavar="LxHxI", help="a random-weight Llama of L layers, hidden H, intermediate I instead of the demo")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qmerge-bench-pipeline"))
    ap.add_argument("--all-candidates", action="store_true", help="also run qmerge with every default candidate in each repetition")
    ap.add_argument("--samples", type=int, help="qmerge's --samples (side-by-side completions; 0: none, the usual workflow's work); default: qmerge's default")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    base, adapter = _demo_inputs()
    inputs = "the cached demo (SmolLM2-135M-Instruct bf16 + the demo QLoRA adapter)"
    if args.random:
        base, adapter, inputs = _random_inputs(args.random, base, args.work)
    a = dict(base=str(base), adapter=str(adapter), device=args.device, seq_len=args.seq_len, group_size=args.group_size,
             calibration_samples=args.calibration_samples, eval_samples=args.eval_samples, samples=args.samples)
    results: dict = {usual: [], qmerge: [], qmerge_all: []}
    workflows = [usual, qmerge, *([qmerge_all] if args.all_candidates else [])]
    with benchlib.LoadSampler() as load:
        for rep in range(args.reps):
            for workflow in workflows if rep % 2 == 0 else workflows[::-1]:
                result = workflow(a, args.work)
                results[workflow].append(result)
                print(f"rep {rep} {workflow.__name__}: {_brief(result)}", flush=True)
    usuals, qmerges = results[usual], results[qmerge]
    shutil.rmtree(args.work, ignore_errors=True)
    tag = (f"{args.device}-random-{args.random}" if args.random else args.device) + (f"-samples{args.samples}" if args.samples is not None else "")
    completions = "qmerge's default side-by-side completions" if args.samples is None else f"qmerge with --samples {args.samples}"
    text = (
        f"Machine: {benchlib.machine()}. {load.summary()} (anything else that ran shows there, "
        f"and wall times carry it; peak RSS does not). Inputs: {inputs}, GPTQ 4-bit g{args.group_size}, {args.calibration_samples} calibration and {args.eval_samples} eval windows "
        f"of {args.seq_len} tokens (stdlib preset), {completions}, device {args.device}, {args.reps} repetitions alternating which workflow runs first, medians.\n\n"
        f"{table(usuals, qmerges)}"
        + (f"\n\n{all_candidates_line(usuals, results[qmerge_all])}" if args.all_candidates else "")
    )
    print(text)
    if args.write:
        benchlib.write_section(f"bench_pipeline-{tag}", f"### Whole pipeline against the usual workflow, {tag} (`scripts/bench_pipeline.py`)\n\n{text}")


def _demo_inputs() -> tuple[Path, Path]:
    """The demo's base and adapter (cached, built on first use), asked of a child: the parent must
    stay free of torch (see benchlib)."""
    code = "import json; from qmerge.demo import prepare_inputs; print(json.dumps(dict(zip(('base', 'adapter'), map(str, prepare_inputs())))))"
    paths = benchlib.run_child([*benchlib.python(), "-c", code]).result
    return Path(paths["base"]), Path(paths["adapter"])


def _random_inputs(shape: str, demo_base: Path, work: Path) -> tuple[Path, Path, str]:
    """A random-weight Llama of shape LxHxI and a random LoRA adapter for it, under `work` (kept
    across repetitions; the work folder is removed at the end)."""
    layers, hidden, intermediate = (int(x) for x in shape.lower().split("x"))
    config = dict(vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                  num_key_value_heads=hidden // 64, max_position_embeddings=2048, tie_word_embeddings=False)
    base, adapter = work / "random-base", work / "random-adapter"
    params = benchlib.make_random_model(base, config, adapter, tokenizer_from=demo_base)
    return base, adapter, f"a random-weight Llama {shape} ({params / 1e6:.0f}M parameters, SmolLM2's tokenizer) + a random r=16 all-linear LoRA adapter"


def _brief(result: dict) -> str:
    if "runs" in result:
        return ", ".join(f"{s} {m.wall_s:.0f} s / {m.peak_rss_mb:.0f} MB" for s, m in result["runs"].items())
    bare = f", bare GPTQ {result['bare'].result['stage_s']} s" if result["bare"] else ""
    return f"{result['run'].wall_s:.0f} s / {result['run'].peak_rss_mb:.0f} MB, stages {json.dumps(result['stages'])}{bare}"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()
