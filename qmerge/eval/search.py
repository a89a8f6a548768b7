"""The drift-budget search: the smallest GPTQ checkpoint (bytes on disk) whose mean KLD against the
model as trained is within the user's budget (`--max-kld X --search`), among those the target
server loads.

Levers, all GPTQModel's own: per-module precision through its `dynamic` overrides (groups of modules
promoted to 8 bits at the run's group size, servable by Marlin; q/k/v and gate/up move together) and
one of its algorithm options, GPTAQ (free in bytes). The order:

1. plain GPTQ at the run's settings, measured (it may already meet the budget); when a plain run of
   the same settings already wrote DIR/gptq (`--resume`), that checkpoint is the first trial;
2. the sensitivity probe (qmerge.eval.sensitivity) ranks the groups by KLD drop per extra byte;
3. plain + GPTAQ, measured: kept for what follows when it lowers the KLD;
4. promote the first k ranked groups, k predicted from the probe's gains scaled to the eval set, then
   measured; the scale is re-fitted on each measurement and k bracketed (largest k known to miss,
   smallest known to meet) until the runs are spent or the bracket closes.

Every tried configuration is a row (size, bits/weight, KLD ± SE on the first eval set), scored as
every GPTQ row is: its stored weights at the bits its `dynamic` gives each module, in float32
(qmerge.quant.gptq_float). The chosen one is the smallest that meets the budget; when none does, the
one of lowest KLD, and the run fails its budget (exit 3) with every output kept.

Why GPTAQ and not GPTQModel's other algorithm options: measured on the demo (BENCHMARKS.md, plain
4-bit g64 KLD 0.0896 in 83 s), GPTAQ gave 0.925 × that KLD in 1.34 × the time, MSE clipping 0.875 ×
in 2.3 ×, act-order 0.95 × in 1.24 ×, FOEM 1.4 × (worse). The search runs up to three such GPTQ runs,
and its whole wall time is meant to stay within 4 plain runs: MSE clipping alone would break that.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from qmerge.eval import sensitivity
from qmerge.eval.drift import CACHE_BUDGET, Scoring
from qmerge.io.memory import release
from qmerge.models.checkpoints import load_candidate
from qmerge.quant import dynamic, sizes
from qmerge.quant.gptq import quantize
from qmerge.quant.gptq_float import load_float32
from qmerge.report import files
from qmerge.settings import GPTQSettings

MAX_RUNS = 4  # trials in all (GPTQ runs, but for a plain one reused), the plain one included
GPTAQ = 0.25  # GPTAQ's alpha, the value GPTQModel recommends
MARGIN = 0.9  # aim below the budget: the probe's additive prediction is approximate
PROBE_WINDOWS, PROBE_LEN = 2, 128  # 256 tokens a forward: 120 groups of SmolLM2-135M probed in about as long as one GPTQ run on 2 CPU cores


@dataclass(frozen=True)
class Job:
    """What a search reads: the merged checkpoint, calibration and eval windows, the reference."""

    merged: Path
    calibration: torch.Tensor
    windows: torch.Tensor  # the first eval set's: the budget is judged on it
    gptq: GPTQSettings
    shapes: dict[str, tuple[int, int]]
    device: torch.device
    budget: float
    batch_size: int = 1
    cache_budget: int = CACHE_BUDGET  # bytes of reference cache held in memory (the memory plan's); more goes to disk under the trials
    verbose: bool = False
    trust_remote_code: bool = False
    echo: bool = True
    plain: list[Path] | None = None  # the files of a checkpoint of the run's plain settings already made (a plain run's stage, same DIR): the first trial


class Search:
    def __init__(self, job: Job, reference: torch.nn.Module, scoring: Scoring, scratch: Path) -> None:
        """`scoring`: the reference's pass over the eval set, run once and shared by every trial;
        `scratch`: where the trials' checkpoints are written, on the disk of the output."""
        self.job, self.reference, self.scoring, self.scratch = job, reference, scoring, scratch
        self.base = dynamic.base_setting(job.gptq)
        self.promoted = replace(self.base, bits=8)
        self.rows: list[dict] = []
        self.dirs: list[Path] = []

    def measure(self, name: str, promoted: tuple[str, ...] = (), gptaq: float = 0.0, members: dict | None = None) -> dict:
        """Quantize with these groups at 8 bits and this GPTAQ alpha, score it on the eval set, add its row."""
        job = self.job
        modules = [m for g in promoted for m in (members or {})[g]]
        dyn = dynamic.write({m: self.promoted for m in modules}, self.base)
        dynamic.check(dyn, job.gptq, job.shapes)
        path = self.scratch / f"trial-{len(self.rows)}"
        start = time.perf_counter()
        reused = job.plain is not None and not dyn and not gptaq
        if reused:
            path.mkdir(parents=True)
            for f in job.plain:
                shutil.copy2(f, path / f.name)  # a GPTQ checkpoint is one flat directory
        else:
            quantize(job.merged, path, job.calibration, job.gptq, job.device, job.verbose, job.trust_remote_code, dynamic=dyn, gptaq=gptaq)
        gptq_s = time.perf_counter() - start
        model = load_float32(path, job.device, job.trust_remote_code)
        self.scoring.score(name, model)
        del model
        release()
        metrics = self.scoring.results([name])[0]["metrics"][name]
        size, bpw = sizes.summary(sizes.checkpoint_layout(path), job.shapes)
        row = {
            "name": name, "size_bytes": size, "bits_per_weight": bpw, "kld_mean": metrics["kld_mean"], "kld_mean_se": metrics["kld_mean_se"],
            "ppl_ratio": metrics["ppl_ratio"], "ok": metrics["kld_mean"] <= job.budget, "gptaq": gptaq, "promoted_groups": list(promoted),
            "modules_8bit": len(modules), "dynamic": dyn, "gptq_s": round(gptq_s, 2), "reused": reused, "wall_s": round(time.perf_counter() - start, 2),
        }
        self.rows.append(row)
        self.dirs.append(path)
        self._say(f"{name}: {size / 2**20:.2f} MiB, {bpw:.3f} bits/weight, KLD {row['kld_mean']:.4g} ± {row['kld_mean_se']:.2g} ({'meets' if row['ok'] else 'misses'} {job.budget:g})")
        return row

    def rank(self) -> tuple[list[str], dict[str, list[str]], dict[str, float], float]:
        """Groups by KLD drop per extra byte when promoted (best first), their members, drops and the probe's plain KLD."""
        job = self.job
        members = sensitivity.groups(list(job.shapes))
        quantized = load_float32(self.dirs[0], job.device, job.trust_remote_code)
        floating = load_candidate(job.merged, job.device, job.trust_remote_code)
        windows = job.calibration[:PROBE_WINDOWS, :PROBE_LEN].to(job.device)
        plain, gains = sensitivity.probe(self.reference, quantized, floating, windows, members, self._say if job.verbose else lambda _: None)
        del quantized, floating
        cost = {g: self.extra_bytes(ms) for g, ms in members.items()}
        order = sorted(members, key=lambda g: gains[g] / max(cost[g], 1), reverse=True)
        return order, members, gains, plain

    def extra_bytes(self, modules: list[str]) -> int:
        shapes = {m: self.job.shapes[m] for m in modules}
        return sum(sizes.gptq_tensors(shapes, replace(self.job.gptq, bits=8)).values()) - sum(sizes.gptq_tensors(shapes, self.job.gptq).values())

    def _say(self, line: str) -> None:
        if self.job.echo:
            print(f"[qmerge] search: {line}", flush=True)


def run(job: Job, reference: torch.nn.Module, out_dir: Path) -> dict:
    """Search, writing the trials under `out_dir`, then leave the chosen checkpoint in `out_dir` with
    the search's record in its search.json (report.json's `search`); returns the record."""
    trials = out_dir / "trials"
    start = time.perf_counter()
    with Scoring(reference, [job.windows], job.batch_size, cache_budget=job.cache_budget, cache_dir=trials) as scoring:
        scoring.run_reference()
        s = Search(job, reference, scoring, trials)
        plain = s.measure(f"plain {s.base.label()}")
        ranking = None
        if not plain["ok"]:
            order, members, gains, probe_plain = s.rank()
            ranking = [{"group": g, "kld_drop": gains[g], "extra_bytes": s.extra_bytes(members[g])} for g in order]
            gptaq = _free_lever(s, plain)
            _allocate(s, job, order, members, gains, probe_plain, gptaq)
    chosen = choose(s.rows)
    s.rows[chosen]["chosen"] = True
    for item in s.dirs[chosen].iterdir():
        shutil.move(str(item), out_dir / item.name)
    shutil.rmtree(trials)
    record = {
        "budget": job.budget, "target": job.gptq.target, "met": s.rows[chosen]["ok"], "chosen": chosen, "rows": s.rows, "ranking": ranking,
        "distance": s.rows[chosen]["kld_mean"] - job.budget, "wall_s": round(time.perf_counter() - start, 2),
        "modules": dynamic.describe(s.rows[chosen]["dynamic"], s.base, sorted(job.shapes)),
    }
    (out_dir / "search.json").write_text(files.dumps(record, indent=2))  # strict JSON: an SE of one window is null
    return record


def _free_lever(s: Search, plain: dict) -> float:
    """GPTAQ at the plain allocation: kept (its alpha returned) when it lowers the KLD."""
    row = s.measure(f"plain {s.base.label()} + GPTAQ", gptaq=GPTAQ)
    return GPTAQ if row["kld_mean"] < plain["kld_mean"] else 0.0


def _allocate(s: Search, job: Job, order: list[str], members: dict, gains: dict, probe_plain: float, gptaq: float) -> None:
    """Promote the first k ranked groups, k bracketed between the largest known to miss and the smallest known to meet."""
    start = min(r["kld_mean"] for r in s.rows if not r["promoted_groups"] and r["gptaq"] == gptaq)
    cumulative = [0.0]
    for g in order:
        cumulative.append(cumulative[-1] + max(gains[g], 0.0))
    scale = start / probe_plain if probe_plain > 0 else 1.0
    lo, hi, margin = 0, None, MARGIN
    while len(s.rows) < MAX_RUNS:
        k = next((k for k in range(lo + 1, len(order) + 1) if start - scale * cumulative[k] <= margin * job.budget), len(order))
        if hi is not None:
            k = min(k, hi - 1)
        if k <= lo or (hi is not None and k >= hi):
            break
        row = s.measure(f"{k}/{len(order)} groups 8-bit" + (" + GPTAQ" if gptaq else ""), tuple(order[:k]), gptaq, members)
        if cumulative[k] > 0:
            scale = max((start - row["kld_mean"]) / cumulative[k], 1e-12)
        if row["ok"]:
            hi, margin = k, 1.0  # met: look for a smaller k, aiming at the budget itself
        else:
            lo = k
            if k == len(order):
                break  # everything promoted and still above: the budget is out of reach of these levers


def choose(rows: list[dict]) -> int:
    """The smallest row that meets the budget; when none does, the one of lowest KLD."""
    ok = [i for i, r in enumerate(rows) if r["ok"]]
    if ok:
        return min(ok, key=lambda i: (rows[i]["size_bytes"], rows[i]["kld_mean"]))
    return min(range(len(rows)), key=lambda i: rows[i]["kld_mean"])
