"""What fits where: the memory plan's arithmetic (qmerge.plan) for Llama-3-8B and Llama-3-70B on
common GPUs, with no GPU and no weights (the model is counted on a weightless copy of its config).

    python scripts/fits.py [--seq-len 2048 --eval-batch 0 --adapter-rank 16] [--write]

Per model and GPU memory: each stage's estimated peak per GPU (and on the host), where the plan puts
the 16-bit candidates (resident, or streamed from host memory a layer at a time), the eval batch it
picks, and whether the run fits. A multi-GPU row spreads the reference and each candidate over the
GPUs (accelerate's device_map="auto"), so each GPU holds its share of the weights and the whole
activations and logits chunk of the layers it runs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmerge.plan import HEADROOM, WORK_BUDGET  # noqa: E402
from qmerge.plan import stages as est  # noqa: E402
from qmerge.plan.shape import Shape  # noqa: E402
from qmerge.settings import DataSettings, RunSettings  # noqa: E402

GB = 1 << 30
MODELS = {  # layers, hidden, intermediate, kv heads, vocabulary (Meta's Llama-3 configs)
    "Llama-3-8B": (32, 4096, 14336, 8, 128256),
    "Llama-3-70B": (80, 8192, 28672, 8, 128256),
}
GPUS = {"1×24 GB": (1, 24), "1×48 GB": (1, 48), "1×80 GB": (1, 80), "2×80 GB": (2, 80), "1×141 GB": (1, 141)}


def shape(name: str, rank: int) -> Shape:
    """Counted from the architecture (Llama: q, k, v, o and the three MLP projections quantized)."""
    layers, h, i, kv, vocab = MODELS[name]
    head = h // (32 if h == 4096 else 64)
    linear_shapes = [(h, h), (kv * head, h), (kv * head, h), (h, h), (i, h), (i, h), (h, i)]
    per_layer = sum(o * n for o, n in linear_shapes)
    return Shape(
        params=layers * (per_layer + 2 * h) + 2 * vocab * h + h, linear=layers * per_layer, largest_linear=i * h, largest=vocab * h,
        layer=per_layer + 2 * h, layers=layers, hidden=h, intermediate=i, vocab=vocab, adapter=layers * sum(rank * (o + n) for o, n in linear_shapes),
    )


def plan_row(model: str, gpus: tuple[int, int], settings: RunSettings, rank: int, host_gb: float) -> list[str]:
    s = shape(model, rank)
    count, size = gpus
    free = size * GB - est.CUDA_CONTEXT
    for stream in (None, "cpu"):
        for batch in ([settings.data.eval_batch] if settings.data.eval_batch else [16, 8, 4, 2, 1]):
            stages = [est.nf4_stage(s, settings, 0, True), est.merged_stage("merged", s, settings, 0, stream, True), est.gptq_stage("gptq", s, settings, 0, True),
                      est.drift_stage(s, settings, 0, batch, stream, (0, 0), True)]
            per_gpu = {st.name: _per_gpu(st, count) for st in stages}
            host = max(st.peak("cpu") for st in stages)
            work = stages[-1].devices["cuda"]["activations"] + stages[-1].devices["cuda"]["logits"]
            if all(v <= HEADROOM * free for v in per_gpu.values()) and host <= HEADROOM * host_gb * GB and (work <= WORK_BUDGET or batch == 1):
                return [model, f"{count}×{size} GB", *(f"{per_gpu[n] / GB:.1f}" for n in ("merged", "gptq", "drift")), f"{host / GB:.0f}",
                        "streamed from host" if stream else "resident", str(batch), "yes"]
    return [model, f"{count}×{size} GB", *(f"{per_gpu[n] / GB:.1f}" for n in ("merged", "gptq", "drift")), f"{host / GB:.0f}", "-", "-", "no"]


def _per_gpu(st, count: int) -> int:
    """A stage's GPU peak with the weights spread over `count` GPUs (activations and logits whole on each)."""
    parts = st.devices.get("cuda", {})
    return int(parts.get("base", 0) + parts.get("weights", 0) / count + sum(v for k, v in parts.items() if k not in ("base", "weights")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--calibration-samples", type=int, default=128)
    ap.add_argument("--eval-batch", type=int, default=0)
    ap.add_argument("--adapter-rank", type=int, default=16)
    ap.add_argument("--host-gb", type=float, default=256, help="host memory of the GPU machine")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    data = DataSettings(seq_len=a.seq_len, eval_samples=a.eval_samples, calibration_samples=a.calibration_samples, eval_batch=a.eval_batch)
    settings = replace(RunSettings(base="-", adapter="-", out=Path("-")), data=data)
    rows = [plan_row(m, gpus, settings, a.adapter_rank, a.host_gb) for m in MODELS for gpus in GPUS.values()]
    header = ["model", "GPUs", "merge+verify GB/GPU", "GPTQ GB/GPU", "drift GB/GPU", "host GB", "16-bit candidates", "eval batch", "fits"]
    import benchlib

    text = (f"The memory plan's arithmetic (`scripts/fits.py`, no GPU needed): default candidates, {a.eval_samples} eval windows of {a.seq_len} tokens, "
            f"{a.calibration_samples} calibration windows, rank-{a.adapter_rank} all-linear adapter, host memory {a.host_gb:.0f} GB, "
            f"{HEADROOM:.0%} of each device usable.\n\n" + benchlib.markdown_table(header, rows))
    print(text)
    if a.write:
        benchlib.write_section("fits", f"### What fits where (the plan's estimate)\n\n{text}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
