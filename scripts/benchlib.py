"""Measurement helpers shared by bench_merge.py, bench_pipeline.py and tests/test_out_of_core.py.

Each measurement runs in a fresh child process, so its peak RSS (the child's own rusage, from
os.wait4) holds nothing left over from an earlier tool. Linux carries the parent's RSS high-water
mark over fork and exec into the child's ru_maxrss, so the benchmark parents never import torch:
even the random models are made in a child (`python scripts/benchlib.py llama|lora ...`). The
machine shares its cores with other work, so the load average is sampled during the run.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Measured:
    """One child run: wall time, peak RSS, and whatever JSON the child printed last on stdout."""

    wall_s: float
    peak_rss_mb: float
    result: dict = field(default_factory=dict)


def run_child(argv: list[str], cgroup: Path | None = None, env: dict | None = None, log: Path | None = None, cwd: Path = REPO) -> Measured:
    """Run `argv` in a fresh process (inside `cgroup` when given); raise with its log when it fails.

    The child's last stdout line, when it is JSON, is its own report (e.g. the stage's wall time
    after imports, or its peak GPU memory)."""
    join = (lambda: _join_cgroup(cgroup)) if cgroup else None
    with tempfile.TemporaryFile("w+") as out, (open(log, "w+") if log else tempfile.TemporaryFile("w+")) as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, preexec_fn=join, env={**os.environ, **(env or {})}, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv[:6]))} ... exited {proc.returncode}:\n{err.read()[-3000:]}")
        result = _last_json(out.read().strip().splitlines())
    return Measured(round(wall, 2), round(usage.ru_maxrss / 1024, 1), result)


def _last_json(lines: list[str]) -> dict:
    for line in reversed(lines):
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    return {}


def report(result: dict) -> None:
    """A child's report to run_child: one JSON line, last on stdout."""
    print(json.dumps(result), flush=True)


# --- memory cgroup (v1) ------------------------------------------------------------------------

def memory_cgroup_root() -> Path | None:
    """This process's own v1 memory cgroup when we may create children in it, else None."""
    try:
        line = next(l for l in Path("/proc/self/cgroup").read_text().splitlines() if l.split(":")[1] == "memory")
    except (OSError, StopIteration, IndexError):
        return None
    root = Path("/sys/fs/cgroup/memory") / line.split(":", 2)[2].lstrip("/")
    return root if (root / "memory.limit_in_bytes").exists() and os.access(root, os.W_OK) else None


@contextlib.contextmanager
def memory_limited(limit_bytes: int):
    """A fresh child cgroup of ours with a hard memory limit (page cache counts, but is reclaimed);
    yields (path, stats) where stats gets max_usage/failcnt/oom_kill after the block."""
    root = memory_cgroup_root()
    if root is None:
        raise RuntimeError("no writable v1 memory cgroup")
    path = root / f"qmerge-ooc-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    stats: dict = {}
    try:
        (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        yield path, stats
        stats["limit_mb"] = limit_bytes / 2**20
        stats["max_usage_mb"] = int((path / "memory.max_usage_in_bytes").read_text()) / 2**20
        stats["failcnt"] = int((path / "memory.failcnt").read_text())
        oom = dict(l.split() for l in (path / "memory.oom_control").read_text().splitlines())
        stats["oom_kill"] = int(oom.get("oom_kill", 0))
    finally:
        path.rmdir()


def _join_cgroup(path: Path) -> None:
    (path / "cgroup.procs").write_text(str(os.getpid()))


# --- machine and load ---------------------------------------------------------------------------

class LoadSampler:
    """Samples the 1-minute load average every few seconds while the benchmark runs."""

    def __init__(self, every_s: float = 5.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), daemon=True)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every_s)

    def summary(self) -> str:
        s = self.samples or [os.getloadavg()[0]]
        return f"1-min load average during the run: min {min(s):.2f}, median {statistics.median(s):.2f}, max {max(s):.2f} ({len(s)} samples)"


def machine(libraries: tuple[str, ...] = ("torch", "transformers", "peft", "bitsandbytes", "gptqmodel", "safetensors")) -> str:
    """One paragraph naming the machine, the day and the library versions."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), platform.processor())
    ram = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))) / 2**20
    versions = []
    for lib in libraries:
        with contextlib.suppress(PackageNotFoundError):
            versions.append(f"{lib} {version(lib)}")
    gpu = _gpu_name()
    return (
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM"
        f"{'; ' + gpu if gpu else ', no GPU'}; Python {platform.python_version()}; {', '.join(versions)}"
    )


def _gpu_name() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=True).stdout.strip()
    return ""


# --- random Llama checkpoints -------------------------------------------------------------------

def make_random_model(base: Path, config: dict, adapter: Path | None = None, tokenizer_from: Path | None = None, r: int = 16) -> int:
    """write_random_llama (and write_random_lora) in a child process; returns the parameter count."""
    argv = [*python(), __file__, "llama", str(base), json.dumps(config), str(tokenizer_from or "")]
    params = run_child(argv).result["params"]
    if adapter is not None:
        run_child([*python(), __file__, "lora", str(base), str(adapter), str(r)])
    return params


def write_random_llama(directory: Path, config: dict, seed: int = 0, tokenizer_from: Path | None = None) -> int:
    """A random-weight Llama checkpoint (bf16 safetensors) made tensor by tensor, so even a model
    larger than memory is written without holding it; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qmerge.io.checkpoint import ShardWriter

    cfg = LlamaConfig(**config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    writer = ShardWriter(directory)
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape)
        else:
            tensor = torch.empty(shape).normal_(0, 0.02, generator=generator)
        writer.add(key, tensor.to(torch.bfloat16))
    writer.finish()
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(directory)
    if tokenizer_from is not None:
        for p in tokenizer_from.iterdir():
            if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                (directory / p.name).write_bytes(p.read_bytes())
    return sum(s.numel() for s in shapes.values())


def write_random_lora(base: Path, directory: Path, r: int = 16, seed: int = 1) -> None:
    """A PEFT LoRA adapter (r, all-linear) for `base`, as PEFT saves one, without loading the base:
    PEFT wraps a weightless (meta) model and only the LoRA factors get real, seeded values."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if name.endswith(("lora_A.default", "lora_B.default")):
            module.to_empty(device="cpu")
            std = 0.02 if name.endswith("lora_A.default") else 0.01
            module.weight.data = torch.empty(module.weight.shape).normal_(0, std, generator=generator)
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(directory)


# --- tables -------------------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def python() -> list[str]:
    """This interpreter, with the worktree's qmerge first on the path (children inherit it)."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return [sys.executable]


def tree_digest(directory: Path) -> str:
    """sha256 over the names and bytes of every file under `directory`, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file():
            h.update(p.relative_to(directory).as_posix().encode())
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def write_section(name: str, text: str, path: Path = REPO / "BENCHMARKS.md") -> None:
    """Replace (or append) the section between `<!-- name -->` and `<!-- /name -->` in BENCHMARKS.md,
    so reruns update their own results and leave the rest of the file alone."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    doc = path.read_text()
    block = f"{start}\n{text.strip()}\n{end}"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


if __name__ == "__main__":
    if sys.argv[1] == "llama":
        report({"params": write_random_llama(Path(sys.argv[2]), json.loads(sys.argv[3]), tokenizer_from=Path(sys.argv[4]) if sys.argv[4] else None)})
    elif sys.argv[1] == "lora":
        write_random_lora(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
