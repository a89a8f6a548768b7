"""Peak memory of each stage of `qmerge run` on random-weight Llamas of growing size, and the memory
plan's estimate beside it.

    python scripts/bench_scale.py --write                       # this checkout, candidates streamed and resident
    python scripts/bench_scale.py --before /tmp/arch --write    # the same sizes with another checkout (before)

Each size: a random-weight Llama (SmolLM2's tokenizer, vocabulary 49152, heads of 64, untied) and a
random r=16 all-linear LoRA adapter; `qmerge run --skip-gptq --candidates merged,base` with short eval
windows (the drift and verify stages hold the reference and one candidate at a time: two candidates
are enough to see what a candidate costs), in a fresh process; GPTQ only up to --gptq-up-to
parameters (GPTQModel on 2 CPU cores takes minutes per 100M). Per stage: the peak resident set of
its worker (report.json `stages`), and with this checkout the plan's estimate (report.json `plan`).
A straight line fitted through (parameters, peak) gives each stage's slope in bytes per parameter:
a stage that holds the model grows ~2 bytes/parameter (16-bit) or more; a streamed one by the 4-bit
reference alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

SIZES = ("8x1024x2816", "16x1536x4096", "24x2048x5632", "32x2048x5632")
STAGES = ("merged", "gptq", "drift")


def model_config(shape: str) -> dict:
    layers, hidden, intermediate = (int(x) for x in shape.split("x"))
    return dict(vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                num_key_value_heads=hidden // 64, max_position_embeddings=2048, tie_word_embeddings=False)


def run_one(repo: Path, base: Path, adapter: Path, out: Path, stream: str | None, gptq: bool, a: argparse.Namespace) -> dict:
    argv = [
        *benchlib.python(), "-m", "qmerge.cli", "run", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device", "cpu",
        "--calibration-samples", str(a.calibration_samples), "--eval-samples", str(a.eval_samples), "--seq-len", str(a.seq_len), "--group-size", "64",
        "--candidates", "merged,base" + (",gptq" if gptq else ""), *([] if gptq else ["--skip-gptq"]), *(["--stream", stream] if stream else []),
    ]
    try:
        m = benchlib.run_child(argv, env={"PYTHONPATH": str(repo)}, cwd=repo)  # `python -m` puts the working directory first on the path
    except RuntimeError as e:  # a run that cannot fit is a result too (before streaming, the large sizes)
        shutil.rmtree(out, ignore_errors=True)
        return {"failed": str(e).splitlines()[0][-80:], "stages": {}, "plan": None, "peak_rss_mb": float("nan")}
    rep = json.loads((out / "report.json").read_text())
    shutil.rmtree(out)
    return {"wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb, "stages": rep["stages"], "plan": rep.get("plan")}


def fit(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of peak (MB) against parameters, in bytes per parameter."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx * 2**20 if sxx else float("nan")


def table(rows: list[dict], modes: list[str]) -> str:
    header = ["model", "params", "16-bit GB", *[f"{st} {m} MB (plan)" for m in modes for st in STAGES], "run peak MB " + " / ".join(modes)]
    body, points = [], {(m, st): [] for m in modes for st in STAGES}
    for r in rows:
        cells = [r["shape"], f"{r['params'] / 1e6:.0f}M", f"{2 * r['params'] / 1e9:.2f}"]
        for m in modes:
            for st in STAGES:
                stage = r[m]["stages"].get(st)
                if stage is None:
                    cells.append("failed" if "failed" in r[m] else "-")
                    continue
                plan = ((r[m]["plan"] or {}).get("stages", {}).get(st) or {}).get("peak_mb", {}).get("cpu")
                cells.append(f"{stage['peak_rss_mb']:.0f}" + (f" ({plan})" if plan else ""))
                points[m, st].append((r["params"], stage["peak_rss_mb"]))
        cells.append(" / ".join(r[m]["failed"] if "failed" in r[m] else f"{r[m]['peak_rss_mb']:.0f}" for m in modes))
        body.append(cells)
    slopes = "; ".join(f"{st} {m}: {fit(p):.2f} B/param" for (m, st), p in points.items() if len(p) >= 2)
    return benchlib.markdown_table(header, body) + f"\n\nFitted slope of each stage's peak against the parameter count: {slopes}."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated LAYERSxHIDDENxINTERMEDIATE")
    ap.add_argument("--before", type=Path, help="a checkout to measure instead of this one (no plan, no --stream)")
    ap.add_argument("--modes", default="always,never", help="--stream values to measure with this checkout")
    ap.add_argument("--gptq-up-to", type=float, default=2e8, help="run the GPTQ stage for models up to this many parameters")
    ap.add_argument("--eval-samples", type=int, default=2)
    ap.add_argument("--calibration-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qmerge-bench-scale"))
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    repo = (a.before or benchlib.REPO).resolve()
    modes = ["before"] if a.before else a.modes.split(",")
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    tokenizer = benchlib.run_child([*benchlib.python(), "-c", "import json; from qmerge.demo import prepare_inputs; print(json.dumps({'base': str(prepare_inputs(False)[0])}))"]).result["base"]
    rows = []
    with benchlib.LoadSampler() as load:
        for shape in a.sizes.split(","):
            base, adapter = a.work / f"{shape}-base", a.work / f"{shape}-adapter"
            params = benchlib.make_random_model(base, model_config(shape), adapter, tokenizer_from=Path(tokenizer))
            row = {"shape": shape, "params": params}
            for m in modes:
                row[m] = run_one(repo, base, adapter, a.work / "out", None if m == "before" else m, params <= a.gptq_up_to, a)
                print(shape, m, json.dumps(row[m]), flush=True)
            rows.append(row)
            shutil.rmtree(base)
            shutil.rmtree(adapter)
    what = f"checkout {repo}" if a.before else "this checkout, candidates streamed (--stream always) and resident (--stream never)"
    text = (
        f"Machine: {benchlib.machine()}. {load.summary()} (anything else that ran shows there; wall times carry it, peaks do not). "
        f"{what}; `qmerge run --skip-gptq --candidates merged,base` (GPTQ too up to {a.gptq_up_to / 1e6:.0f}M parameters), {a.eval_samples} eval windows of {a.seq_len} tokens, "
        f"{a.calibration_samples} calibration windows; peak RSS of each stage's worker, the plan's estimate in brackets.\n\n{table(rows, modes)}"
    )
    print(text)
    if a.write:
        tag = "before" if a.before else "after"
        benchlib.write_section(f"bench_scale-{tag}", f"### Stage peaks against model size, {tag} (`scripts/bench_scale.py`)\n\n{text}")


if __name__ == "__main__":
    main()
