"""The memory plan: before the first heavy stage, each stage's estimated peak on every device it uses
(the process's own baseline, weights, activations, the logits chunk, the reference cache) and the
free disk the run needs, printed and written to report.json. The plan also decides where the
candidates of verify and drift live (resident, or streamed a layer at a time when they do not fit
beside the reference), whether the reference cache stays in memory, and the eval batch on a GPU. A
plan that cannot fit even so is refused with one line naming the stage and the fix.

The arithmetic is in plan.stages, from the model's plan.shape.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from qmerge.errors import QmergeError
from qmerge.io.memory import available_bytes, baseline_bytes
from qmerge.models.placement import Placement
from qmerge.plan import stages as est
from qmerge.plan.shape import Shape, shape_of
from qmerge.plan.stages import StagePlan

GB = 1 << 30
HEADROOM = 0.9  # of the available memory a plan lets a stage use
WORK_BUDGET = 6 * GB  # the most an automatic eval batch gives the activations and logits chunk on a GPU
CACHE_IN_MEMORY = {"cpu": 64 << 20}  # on CPU the reference cache goes to disk (page cache) beyond this; on a GPU host, up to a quarter of RAM


@dataclass(frozen=True)
class Plan:
    available: dict[str, int]  # device → bytes the run may use
    disk_free: int
    stages: tuple[StagePlan, ...]
    eval_batch: int
    stream: str | None  # candidates that do not fit: None (all resident), "cpu" or "disk"
    cache_budget: int  # bytes of reference cache held in memory (more goes to disk)
    device: torch.device
    max_memory: dict | None = None  # several GPUs: accelerate's max_memory for the reference and the candidates spread over them
    decode_budget: int = 0  # bytes the completions may make weights in once (models.decoding): planned in the drift stage when they fit

    def placement(self, offload_dir: Path) -> Placement:
        """Where the candidates of verify and drift live."""
        return Placement(self.device, stream=self.stream, max_memory=self.max_memory, offload_dir=offload_dir)

    def reference_placement(self) -> Placement:
        return Placement(self.device, max_memory=self.max_memory)

    @property
    def disk_need(self) -> int:
        return sum(st.disk for st in self.stages)

    def lines(self) -> list[str]:
        avail = ", ".join(f"{d} {b / GB:.1f} GB" for d, b in self.available.items())
        out = [f"memory plan (available {avail}; disk: {self.disk_need / GB:.2f} GB needed, {self.disk_free / GB:.1f} GB free):"]
        for st in self.stages:
            for device, parts in st.devices.items():
                detail = " + ".join(f"{k} {v / GB:.2f}" for k, v in parts.items() if v)
                note = f" ({'; '.join(st.notes)})" if st.notes else ""
                out.append(f"  {st.name:<15} {device:<5} {st.peak(device) / GB:6.2f} GB = {detail}{note}")
        return out

    def to_dict(self) -> dict:
        mb = lambda b: round(b / 2**20)  # noqa: E731
        return {
            "available_mb": {d: mb(b) for d, b in self.available.items()}, "disk_free_mb": mb(self.disk_free), "disk_need_mb": mb(self.disk_need),
            "eval_batch": self.eval_batch, "stream": self.stream, "cache_in_memory_mb": mb(self.cache_budget),
            "stages": {st.name: {"peak_mb": {d: mb(st.peak(d)) for d in st.devices}, "parts_mb": {d: {k: mb(v) for k, v in p.items()} for d, p in st.devices.items()},
                                 "disk_mb": mb(st.disk), "notes": st.notes} for st in self.stages},
        }

    def check(self) -> None:
        """Refuse, in one line, the first stage that cannot fit, naming the fix."""
        for st in self.stages:
            for device, parts in st.devices.items():
                limit = self.available.get(device, self.available.get("cuda", 0))
                if st.peak(device) > HEADROOM * limit:
                    raise QmergeError(
                        f"memory plan: the {st.name} stage needs ~{st.peak(device) / GB:.1f} GB on {device}, more than the {HEADROOM:.0%} of its available "
                        f"{limit / GB:.1f} GB a stage may use; {_fix(st.name)}"
                    )
        if self.disk_need > self.disk_free:
            raise QmergeError(
                f"memory plan: the run writes ~{_size(self.disk_need)} (merged, GPTQ and its offload, reference cache) but {_size(self.disk_free)} is free at --out; "
                "no space left for it: free space or choose another --out"
            )


def _fix(stage: str) -> str:
    if stage == "drift":
        return "lower --eval-batch or --seq-len, evaluate fewer --candidates, or use --device auto on a machine with (more) GPUs"
    if stage.startswith("gptq"):
        return "use --skip-gptq or fewer --calibration-samples, or a GPU (--device auto)"
    return "use a machine with more memory, or a GPU (--device auto)"


def make(settings, p, out: Path, forked_workers: bool) -> Plan:
    """The plan for this run on this machine (settings: RunSettings, p: prepare.Prepared)."""
    from transformers import AutoConfig

    shape = shape_of(AutoConfig.from_pretrained(p.base_dir, trust_remote_code=p.trust_remote_code), p.linears, p.mix, p.trust_remote_code)
    cuda = p.device.type == "cuda"
    available = {"cpu": available_bytes("cpu"), **({"cuda": available_bytes(str(p.device))} if cuda else {})}
    base = baseline_bytes(forked_workers)
    d = settings.data
    cache_total = shape.cache_bytes(sum(len(e.windows) for e in p.evaluations), d.seq_len)
    in_memory = cache_total <= (available["cpu"] // 4 if cuda else CACHE_IN_MEMORY["cpu"])
    cache = (cache_total, 0) if in_memory else (0, cache_total)
    options = [None, "cpu", "disk"] if cuda else [None, "disk"]
    options = {"auto": options, "always": options[1:], "never": [None]}[settings.stream]
    for stream in options:
        batch = d.eval_batch or (_gpu_batch(shape, settings, available["cuda"], stream, cache) if cuda else 1)
        planned = _stages(settings, shape, base, batch, stream, cache, cuda, p.prequantized)
        if all(st.peak(dev) <= HEADROOM * available[dev] for st in planned if st.name in ("merged", "drift") for dev in st.devices):
            break
    gpus = torch.cuda.device_count() if cuda and settings.device == "auto" else 1
    max_memory = None
    if gpus > 1:  # --device auto on several GPUs: the weights spread over them, each GPU keeps room for the activations and logits
        planned = [_spread(st, gpus) for st in planned]
        work = max(st.peak("cuda") - st.devices["cuda"].get("weights", 0) for st in planned if "cuda" in st.devices)
        max_memory = {i: max(0, int(HEADROOM * available_bytes(f"cuda:{i}")) - work) for i in range(gpus)}
        if stream is not None:
            max_memory["cpu"] = int(HEADROOM * available["cpu"])
    decode = _decode_budget(planned, shape, settings, available, cuda) if stream is None and max_memory is None else 0
    free = shutil.disk_usage(_existing(out)).free
    return Plan(available, free, tuple(planned), batch, stream, cache[0], p.device, max_memory, decode)


def _decode_budget(planned: list[StagePlan], shape: Shape, settings, available: dict[str, int], cuda: bool) -> int:
    """Room for the completions' weights made once, added to the drift stage's plan when it fits
    there (0: the completions make them per token, as scoring does)."""
    need, device = est.decode_weights(shape), "cuda" if cuda else "cpu"
    drift = next(st for st in planned if st.name == "drift")
    if settings.data.samples == 0 or drift.peak(device) + need > HEADROOM * available[device]:
        return 0
    drift.devices[device]["completions"] = need
    return need


def _spread(st: StagePlan, gpus: int) -> StagePlan:
    """A stage's GPU peak with its weights shared by `gpus` GPUs (per GPU)."""
    if "cuda" not in st.devices:
        return st
    cuda = {k: v // gpus if k == "weights" else v for k, v in st.devices["cuda"].items()}
    return StagePlan(st.name, {**st.devices, "cuda": cuda}, st.disk, [*st.notes, f"spread over {gpus} GPUs"])


def _stages(settings, shape: Shape, base: int, batch: int, stream: str | None, cache: tuple[int, int], cuda: bool, prequantized: bool) -> list[StagePlan]:
    kinds = settings.evaluated
    out = [est.nf4_stage(shape, settings, base, cuda)] if settings.reference_kind == "qlora" and not prequantized else []
    out.append(est.merged_stage("merged", shape, settings, base, stream, cuda))
    if "gptq" in kinds:
        out.append(est.gptq_stage("gptq", shape, settings, base, cuda, cache[0]))
    if "gptq-original" in kinds:
        out += [est.merged_stage("merged-original", shape, settings, base, stream, cuda), est.gptq_stage("gptq-original", shape, settings, base, cuda)]
    out.append(est.drift_stage(shape, settings, base, batch, stream, cache, cuda))
    return out


def _gpu_batch(shape: Shape, settings, free: int, stream: str | None, cache: tuple[int, int]) -> int:
    """The largest eval batch (windows per forward, up to 16) whose drift stage fits the GPU with its
    activations and logits chunk within WORK_BUDGET (past a few thousand tokens per forward a GPU is
    busy; more only takes memory)."""
    windows = settings.data.eval_samples
    for batch in (16, 8, 4, 2, 1):
        gpu = est.drift_stage(shape, settings, 0, batch, stream, cache, True).devices["cuda"]
        if batch <= windows and sum(gpu.values()) <= HEADROOM * free and gpu["activations"] + gpu["logits"] <= WORK_BUDGET:
            return batch
    return 1


def _existing(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def _size(n: int) -> str:
    """Bytes in words a reader can compare: GB, or MB below one GB (a tiny model's run is MBs)."""
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 2**20:.0f} MB"
