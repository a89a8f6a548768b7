"""Every GPU check in one run (see scripts/device_check.sh): NF4 round trip on the GPU against what
bitsandbytes' Linear4bit holds there and against the CPU round trip; the tiny-model pipeline on the
GPU with merged-vs-reference KLD; copy and disk bandwidth; the merge, GPTQ and drift stages on a
random Llama-2-7B-shaped checkpoint; and (`--only run8b`, on its own: it takes most of a 15-minute
lease) the whole `qmerge run` on a random Llama-3-8B-shaped model, per-stage wall and peak GPU memory
beside the memory plan's estimate. Prints one table and writes results.json + results.md to --out."""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from qmerge.io.checkpoint import ShardWriter  # noqa: E402
from qmerge.settings import NF4Settings  # noqa: E402

GPU = torch.device("cuda")
rows: list[tuple[str, str]] = []
results: dict = {}


def record(name: str, value) -> None:
    results[name] = value
    rows.append((name, value if isinstance(value, str) else json.dumps(value)))
    print(f"  {name}: {rows[-1][1]}", flush=True)


def step(fn):
    def run(*a):
        t = time.perf_counter()
        try:
            fn(*a)
        except Exception as e:  # one failed check must not hide the others
            record(f"{fn.__name__} FAILED", f"{type(e).__name__}: {e}"[:300])
            traceback.print_exc()
        record(f"{fn.__name__} wall_s", round(time.perf_counter() - t, 2))

    return run


@step
def nf4_bit_exact(work: Path) -> None:
    """Round trip on the GPU == what Linear4bit holds after a real GPU load, and (rounded to the compute
    dtype) == what its matmul_4bit multiplies by on the GPU (the fused kernel included); CPU and GPU agree."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    from conftest import make_base
    from qmerge.io.checkpoint import LazyCheckpoint
    from qmerge.merge.nf4 import bnb_config, exact_round_trip, round_trip

    base = make_base(work / "nf4-base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=bnb_config(NF4Settings(), "float32"), device_map={"": GPU})
    ckpt = LazyCheckpoint.open(base)
    same = computed = 0
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    for name, m in mods:
        same += torch.equal(exact_round_trip(ckpt.get(f"{name}.weight"), NF4Settings(), GPU), F.dequantize_4bit(m.weight.data, m.weight.quant_state))
        eye = torch.eye(m.in_features, dtype=torch.bfloat16, device=GPU)
        with torch.no_grad():
            used = bnb.matmul_4bit(eye, m.weight.t(), quant_state=m.weight.quant_state).T
        computed += torch.equal(round_trip(ckpt.get(f"{name}.weight"), NF4Settings(), GPU), used)
    record("nf4 gpu == Linear4bit on gpu (modules)", f"{same}/{len(mods)}")
    record("nf4 round_trip == matmul_4bit's bf16 weight on gpu (modules)", f"{computed}/{len(mods)}")
    g = torch.Generator().manual_seed(0)
    for shape in ((4096, 4096), (11008, 4096), (4096, 11008)):
        w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        codes, absmax = {}, {}
        for dev in ("cpu", "cuda"):
            packed, state = F.quantize_4bit(w.float().to(dev), blocksize=64, compress_statistics=True, quant_type="nf4")
            codes[dev], absmax[dev] = packed.cpu(), F.dequantize_blockwise(state.absmax, state.state2).cpu() + state.offset.cpu()
        nibbles = torch.stack([codes["cpu"] >> 4, codes["cpu"] & 15]) != torch.stack([codes["cuda"] >> 4, codes["cuda"] & 15])
        on_gpu = exact_round_trip(w, NF4Settings(), GPU).cpu()
        on_cpu = exact_round_trip(w, NF4Settings(), torch.device("cpu"))
        record(
            f"nf4 cpu vs gpu {shape[0]}x{shape[1]}: codes differing, absmax max rel diff, values differing, max abs",
            [nibbles.float().mean().item(), ((absmax["cpu"] - absmax["cuda"]).abs() / absmax["cuda"]).max().item(),
             (on_gpu != on_cpu).float().mean().item(), (on_gpu - on_cpu).abs().max().item()],
        )


@step
def tiny_pipeline_on_gpu(work: Path) -> None:
    """qmerge run --device cuda on the tiny model: merged and GPTQ KLD against the reference."""
    from conftest import make_base, make_qlora_adapter
    from qmerge import pipeline
    from qmerge.settings import DataSettings, GPTQSettings, RunSettings

    base = make_base(work / "tiny-base")
    adapter = make_qlora_adapter(base, work / "tiny-adapter")
    data = DataSettings(calibration_samples=16, eval_samples=8, seq_len=64)
    for skip in (False, True):
        try:
            rep = pipeline.run(
                RunSettings(base=str(base), adapter=str(adapter), out=work / f"tiny-out-{skip}", gptq=GPTQSettings(group_size=32), data=data, device="cuda", skip_gptq=skip),
                echo=False,
            )
        except Exception as e:
            record(f"tiny run (skip_gptq={skip}) FAILED", f"{type(e).__name__}: {e}"[:300])
            traceback.print_exc()
            continue
        for name, m in rep["evaluations"][0]["metrics"].items():
            record(f"tiny gpu: {name} mean KLD / top1", [m["kld_mean"], m["top1_agreement"]])
        record("tiny gpu candidates", rep["candidates"])
        record("tiny gpu stages", rep["stages"])
        break


@step
def bandwidth(work: Path) -> None:
    n = 2 * 1024**3
    a = torch.empty(n, dtype=torch.uint8, device=GPU)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    record("device copy GB/s (read+write)", round(2 * 10 * n / (time.perf_counter() - t) / 1e9, 1))
    del a, b
    buf = os.urandom(64 * 1024**2)
    path = work / "disk.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(32):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    record("disk write GB/s (2 GiB, fsync)", round(32 * len(buf) / (time.perf_counter() - t) / 1e9, 2))
    path.unlink()


def write_llama(work: Path, name: str, layers: int, hidden: int = 4096, intermediate: int = 11008, kv_heads: int = 32, vocab: int = 32000,
                device: torch.device = GPU) -> tuple[Path, Path]:
    """A random Llama-shaped bf16 checkpoint (Llama-2-7B's shape by default) and a random r=16
    all-linear adapter, made on `device` (the GPU: seconds, not minutes)."""
    from transformers import LlamaConfig

    from conftest import make_tokenizer

    head = hidden // 32
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=kv_heads,
                      vocab_size=vocab, max_position_embeddings=8192, tie_word_embeddings=False)
    base, adapter = work / f"{name}-base", work / f"{name}-adapter"
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(base)
    make_tokenizer(base, 512)  # GPTQModel loads a tokenizer with the model; the text uses 512 of the vocabulary's ids
    writer = ShardWriter(base, max_shard_bytes=5 * 1024**3)
    lora = {}
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    writer.add("model.embed_tokens.weight", rnd(vocab, hidden))
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv_heads * head, hidden), "self_attn.v_proj": (kv_heads * head, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden), "mlp.down_proj": (hidden, intermediate)}
    for i in range(layers):
        for module, (o, n) in shapes.items():
            key = f"model.layers.{i}.{module}"
            writer.add(f"{key}.weight", rnd(o, n))
            lora[f"base_model.model.{key}.lora_A.weight"] = (torch.randn(16, n, generator=g, device=device) * 0.01).cpu()
            lora[f"base_model.model.{key}.lora_B.weight"] = (torch.randn(o, 16, generator=g, device=device) * 0.01).cpu()
        writer.add(f"model.layers.{i}.input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        writer.add(f"model.layers.{i}.post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    writer.add("lm_head.weight", rnd(vocab, hidden))
    writer.finish()
    from safetensors.torch import save_file

    adapter.mkdir()
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": [m.split(".")[1] for m in shapes]}))
    return base, adapter


@step
def merge_7b(work: Path, layers: int) -> None:
    from qmerge.merge.adapter import load_adapter
    from qmerge.merge.streaming import merge

    t = time.perf_counter()
    base, adapter_dir = write_llama(work, "7b", layers)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    record(f"7b-shaped ({layers} layers) checkpoint GB / write s", [round(size / 1e9, 2), round(time.perf_counter() - t, 1)])
    adapter = load_adapter(adapter_dir)
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    result = merge(base, adapter, work / "7b-merged", NF4Settings(), "bfloat16", GPU, show_progress=False)
    dt = time.perf_counter() - t
    record("7b merge s / GB/s (read+write) / peak GPU MB", [round(dt, 1), round(2 * size / dt / 1e9, 2), round(torch.cuda.max_memory_allocated() / 2**20)])
    record("7b merge modules (nf4, lora)", [result.nf4_modules, result.lora_modules])


def past(deadline: float, check: str) -> bool:
    """A late check is skipped (and says so) so that the run stays inside the device time it was given."""
    if time.time() > deadline:
        record(check, "skipped: not enough time left in this run")
        return True
    return False


def random_windows(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 32000, (n, 512), generator=torch.Generator().manual_seed(seed))


@step
def gptq_7b(work: Path, deadline: float) -> None:
    """GPTQ of the 7B-shaped merged model on the GPU, 8 random-token windows of 512 (timing only)."""
    from qmerge.quant.gptq import quantize
    from qmerge.settings import GPTQSettings

    if past(deadline, "gptq 7b"):
        return
    calibration = random_windows(8, seed=0)
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    log = quantize(work / "7b-merged", work / "7b-gptq", calibration, GPTQSettings(group_size=128), GPU)
    record("7b gptq s / modules / peak GPU MB", [round(time.perf_counter() - t, 1), len(log), round(torch.cuda.max_memory_allocated() / 2**20)])


@step
def drift_7b(work: Path, deadline: float) -> None:
    """The drift stage on the 7B-shaped model: the reference (bitsandbytes 4-bit + adapter, float32
    compute), DIR/merged and the GPTQ checkpoint's weights, both in float32, 4 random-token windows of 512
    (timing and memory; the weights are random, so the KLDs only show that the path runs)."""
    from qmerge.eval.drift import evaluate
    from qmerge.merge.adapter import load_mix
    from qmerge.eval.candidates import load_checkpoint
    from qmerge.models.reference import load_reference

    if past(deadline, "drift 7b"):
        return
    windows = random_windows(4, seed=1)
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    reference = load_reference(work / "7b-base", load_mix((str(work / "7b-adapter"),)), NF4Settings(), GPU)
    models = {name: functools.partial(load_checkpoint, work / f"7b-{name}", GPU) for name in ("merged", "gptq") if (work / f"7b-{name}").exists()}
    loaded = time.perf_counter() - t
    t = time.perf_counter()
    result = evaluate(reference, models, [windows], "bfloat16", show_progress=False)[0]
    record("7b drift reference load s / evaluate s incl. candidate loads (4x512; reference, noise floor, " + ", ".join(models) + ") / peak GPU MB",
           [round(loaded, 1), round(time.perf_counter() - t, 1), round(torch.cuda.max_memory_allocated() / 2**20)])
    record("7b drift mean KLD (random weights)", {name: m["kld_mean"] for name, m in result["metrics"].items()})


@step
def llama3_8b_run(work: Path, deadline: float, run: argparse.Namespace) -> None:
    """Issue 15's GPU measurement: the whole `qmerge run` with default candidates on a random-weight
    Llama-3-8B-shaped model (vocabulary 128256, 8 KV heads) with a rank-16 all-linear adapter, 32
    eval windows of 2048 tokens: wall and peak GPU memory per stage beside the memory plan's estimate
    (goal: peak ≤ 4-bit reference + one 16-bit candidate + 6 GB, whole run ≤ 10 min). With `--device
    cpu` the same run's CPU-side figures (peak RSS per stage), on fewer and shorter windows and
    without GPTQ (`--skip-gptq`) where a machine without a GPU cannot afford them."""
    if past(deadline - 480, "llama-3-8b run"):
        return
    t = time.perf_counter()
    base, adapter = write_llama(work, "l3", 32, 4096, 14336, 8, 128256, device=torch.device(run.device))
    record("llama-3-8b-shaped checkpoint: write s", round(time.perf_counter() - t, 1))
    out = work / "l3-out"
    cmd = [sys.executable, "-m", "qmerge.cli", "run", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device", run.device,
           "--seq-len", str(run.seq_len), "--eval-samples", str(run.eval_samples), "--calibration-samples", str(run.calibration_samples), "--group-size", "128",
           *(["--skip-gptq"] if run.skip_gptq else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=max(60, deadline - time.time()))
    record("llama-3-8b run: wall s, exit status", [round(time.perf_counter() - t, 1), done.returncode])
    print(done.stdout[-4000:], done.stderr[-4000:], flush=True)
    if done.returncode != 0:
        return
    rep = json.loads((out / "report.json").read_text())
    record("llama-3-8b stages: wall s, peak GPU MB, peak RSS MB", {k: [v.get("wall_s"), v.get("peak_gpu_mb"), v.get("peak_rss_mb")] for k, v in rep["stages"].items()})
    record("llama-3-8b plan: estimated peak MB per stage and device", {k: v["peak_mb"] for k, v in rep["plan"]["stages"].items()})
    record("llama-3-8b plan: eval batch, streamed candidates, reference cache in memory MB", [rep["plan"][k] for k in ("eval_batch", "stream", "cache_in_memory_mb")])
    record("llama-3-8b mean KLD (random weights: shows the path runs)", {n: m["kld_mean"] for n, m in rep["evaluations"][0]["metrics"].items()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--only", default="nf4,tiny,bandwidth,7b", help="comma-separated subset of the checks: nf4, tiny, bandwidth, 7b, run8b (issue 15's whole run; give it a run of its own)")
    parser.add_argument("--calibration-samples", type=int, default=128, help="calibration windows of the run8b check")
    parser.add_argument("--eval-samples", type=int, default=32, help="eval windows of the run8b check")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per window of the run8b check")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu: the run8b check's CPU-side figures on a machine without a GPU (the other checks need one)")
    parser.add_argument("--skip-gptq", action="store_true", help="the run8b check without its GPTQ stage (an 8B GPTQ takes hours on a few CPU cores)")
    parser.add_argument("--deadline", type=float, default=840, help="seconds the whole script may take (run8b stops its run there)")
    parser.add_argument("--gptq-after", type=float, default=240, help="skip the 7B GPTQ if this many seconds have passed")
    parser.add_argument("--drift-after", type=float, default=360, help="skip the 7B drift stage if this many seconds have passed")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    import bitsandbytes

    record("gpu", torch.cuda.get_device_name() if args.device != "cpu" else f"none: CPU only ({os.cpu_count()} cores)")
    record("versions", {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__})
    with tempfile.TemporaryDirectory(dir=os.environ.get("WORK_DIR", "/tmp")) as tmp:
        work = Path(tmp)
        only = set(args.only.split(","))
        if "nf4" in only:
            nf4_bit_exact(work)
        if "tiny" in only:
            tiny_pipeline_on_gpu(work)
        if "bandwidth" in only:
            bandwidth(work)
        if "7b" in only:
            merge_7b(work, args.layers)
            gptq_7b(work, start + args.gptq_after)
            drift_7b(work, start + args.drift_after)
        if "run8b" in only:
            llama3_8b_run(work, start + args.deadline, args)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = "| check | result |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    (args.out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
