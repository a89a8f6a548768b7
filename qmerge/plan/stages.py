"""Each stage's estimated peak per device, in bytes, from a model's Shape: the arithmetic of the
memory plan. The constants are calibrated against measured peaks on CPU (scripts/bench_scale.py;
tests/test_plan.py keeps the estimates within ±25% of the measured peak of every stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qmerge.eval.metrics import POSITIONS
from qmerge.plan.shape import Shape
from qmerge.settings import RunSettings

# Calibrated on CPU (2026-11-29, random-weight Llamas 0.1B–1.5B, BENCHMARKS.md "memory plan"):
MERGE_PER_ELEMENT = 22  # bytes per element of the largest tensor while the merge holds it (bf16 read, float32 round trip and delta, output)
ACTIVATION_H, ACTIVATION_I = 14, 4  # float32 values per token per hidden / intermediate unit alive inside a layer's forward
LOGIT_BYTES = 48  # per position and vocabulary entry of a metrics chunk (two float32 logits, four float64 temporaries)
GPTQ_MODEL_BYTES = 2  # GPTQModel holds the model in 16 bits on the host while it quantizes
CUDA_CONTEXT = 600 * 2**20  # what CUDA and its kernels take on a GPU before any tensor


@dataclass
class StagePlan:
    name: str
    devices: dict[str, dict[str, int]]  # device → part → bytes
    disk: int = 0  # bytes the stage writes that stay (or stay while the run lasts)
    notes: list[str] = field(default_factory=list)

    def peak(self, device: str) -> int:
        return sum(self.devices.get(device, {}).values())


def nf4_bytes(s: Shape, double_quant: bool) -> int:
    """The reference: 4-bit linear weights with their block statistics, everything else in float32
    (as load_base holds it), the adapters in float32."""
    per = 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
    return int(s.linear * per) + 4 * (s.other + s.adapter)


def candidate_bytes(kind: str, s: Shape, streamed: bool, gptq_bits: int, reference: int, cuda: bool) -> int:
    """One drift candidate's weights as it is held (models.checkpoints, eval.candidates)."""
    if kind in ("merged", "original", "base"):
        return _sixteen_bit(s, streamed)
    if kind == "peft-nf4":
        return reference  # a copy of the reference, merged and re-rounded to NF4
    if kind == "rtn":
        return 2 * s.other + s.linear  # int8 levels, the rest as DIR/merged stores it
    # gptq, gptq-original: GPTQ layers (codes, scales, zeros) and the rest in float32 on CPU (float16 on CUDA)
    return int(s.linear * (gptq_bits / 8 + 0.05)) + (2 if cuda else 4) * s.other


def _sixteen_bit(s: Shape, streamed: bool) -> int:
    if streamed:  # embeddings and head resident, one module's weights in flight (and its float32 upcast)
        return 2 * (s.other + s.layer) + 4 * s.largest_linear
    return 2 * s.params


def activations(s: Shape, batch: int, seq_len: int) -> int:
    return batch * seq_len * (ACTIVATION_H * s.hidden + ACTIVATION_I * s.intermediate) * 4


def logits(s: Shape, batch: int, seq_len: int) -> int:
    """A metrics chunk, and the final hidden states of the reference and the candidate."""
    return POSITIONS * s.vocab * LOGIT_BYTES + 2 * batch * seq_len * s.hidden * 4


def merged_stage(name: str, s: Shape, settings: RunSettings, base: int, stream: str | None, cuda: bool) -> StagePlan:
    """The merge (one tensor at a time) then verify (the reference, DIR/merged for the logits check,
    one module of PEFT's merge in float32), whichever is larger."""
    reference = nf4_bytes(s, settings.nf4.double_quant) if settings.reference_kind == "qlora" else 2 * s.params
    streamed = stream is not None
    verify = {"weights": reference + _sixteen_bit(s, streamed), "activations": activations(s, 1, 128), "logits": logits(s, 1, 128)}
    merge = {"weights": MERGE_PER_ELEMENT * s.largest}
    parts = verify if sum(verify.values()) > sum(merge.values()) else merge
    devices = {"cpu": {"base": base, **({"weights": _host_copy(s, stream)} if cuda else parts)}}
    if cuda:
        devices["cuda"] = {"base": CUDA_CONTEXT, **parts}
    written = s.params * _itemsize(settings.merged_dtype)
    return StagePlan(name, devices, disk=written, notes=["DIR/merged streamed in by layers" if streamed else "DIR/merged resident"])


def gptq_stage(name: str, s: Shape, settings: RunSettings, base: int, cuda: bool) -> StagePlan:
    """GPTQModel: the model in 16 bits on the host, one layer, its Hessians and the calibration
    activations where it computes."""
    d = settings.data
    calibration = d.calibration_samples * d.seq_len * s.hidden * 4 * 2
    hessians = 4 * max(s.hidden, s.intermediate) ** 2 + 3 * 4 * s.hidden**2
    work = {"weights": 4 * s.layer, "activations": calibration + hessians}
    devices = {"cpu": {"base": base, "weights": GPTQ_MODEL_BYTES * s.params, **({} if cuda else {"activations": work["activations"]})}}
    if cuda:
        devices["cuda"] = {"base": CUDA_CONTEXT, **work}
    size = int(s.linear * (settings.gptq.bits / 8 + 0.05)) + 2 * s.other
    return StagePlan(name, devices, disk=2 * size)  # the checkpoint, and GPTQModel's offload while it works


def drift_stage(s: Shape, settings: RunSettings, base: int, batch: int, stream: str | None, cache: tuple[int, int], cuda: bool) -> StagePlan:
    """The reference, the largest candidate beside it, one batch's activations and a logits chunk,
    the reference cache (in memory, on disk) bytes."""
    cache_in_memory, cache_on_disk = cache
    streamed = stream is not None
    d = settings.data
    reference = nf4_bytes(s, settings.nf4.double_quant) if settings.reference_kind == "qlora" else 2 * s.params
    largest = max((candidate_bytes(k, s, streamed, settings.gptq.bits, reference, cuda) for k in settings.evaluated), default=0)
    parts = {"weights": reference + largest, "activations": activations(s, batch, d.seq_len), "logits": logits(s, batch, d.seq_len)}
    devices = {"cpu": {"base": base, **({"weights": _host_copy(s, stream)} if cuda else parts), "cache": cache_in_memory}}
    if cuda:
        devices["cuda"] = {"base": CUDA_CONTEXT, **parts}
    notes = [f"candidates {'streamed by layers' if streamed else 'resident'}", f"reference cache {'in memory' if cache_in_memory else 'on disk'}"]
    return StagePlan("drift", devices, disk=cache_on_disk, notes=notes)


def _host_copy(s: Shape, stream: str | None) -> int:
    """On a GPU, a candidate streamed from host memory is held there in 16 bits."""
    return 2 * s.params if stream == "cpu" else 0


def _itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2
