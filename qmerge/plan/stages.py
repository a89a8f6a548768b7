"""Each stage's estimated peak per device, in bytes, from a model's Shape: the arithmetic of the
memory plan. Resident sets on CPU count the pages of a checkpoint a model's tensors are mapped from
(safetensors loads tensors of the stored dtype without copying them), as the kernel does. The
constants are calibrated against measured peaks on CPU (scripts/bench_scale.py; tests/test_plan.py
keeps the estimates within ±25% of the measured peak of every stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qmerge.eval.metrics import POSITIONS, head_positions
from qmerge.eval.search import MAX_RUNS
from qmerge.models.float32 import UPCAST_ELEMENTS
from qmerge.plan.shape import Shape
from qmerge.settings import RunSettings

# Calibrated on CPU (2026-11-29, random-weight Llamas 0.2B–1.8B, BENCHMARKS.md "Stage peaks against model size"):
QUANTIZE_PER_ELEMENT = 16  # bytes per element of the largest linear weight while bitsandbytes quantizes it (float32 copy and temporaries)
MERGE_PER_ELEMENT = 14  # while the merge holds one (4-bit codes read, float32 weight and delta, 16-bit output)
EXPECTED_PER_ELEMENT = 12  # while verify holds one module of PEFT's merge (float32 weight, delta, merged)
ACTIVATION_H, ACTIVATION_I = 14, 4  # float32 values per token per hidden / intermediate unit alive inside a layer's forward
LOGIT_BYTES = 48  # per position and vocabulary entry of a metrics chunk (two float32 logits, four float64 temporaries)
CUDA_CONTEXT = 600 * 2**20  # what CUDA and its kernels take on a GPU before any tensor
GPTQ_ENGINE = 250 * 2**20  # GPTQModel imported and its CPU kernel compiled (torch.compile), in the stages that load it


@dataclass
class StagePlan:
    name: str
    devices: dict[str, dict[str, int]]  # device → part → bytes
    disk: int = 0  # bytes the stage writes that stay (or stay while the run lasts)
    notes: list[str] = field(default_factory=list)

    def peak(self, device: str) -> int:
        return sum(self.devices.get(device, {}).values())


def reference_bytes(s: Shape, settings: RunSettings, cuda: bool) -> int:
    """The reference: 4-bit linear weights with their block statistics; everything else in float32 (as
    load_base holds it), on CPU also the 16-bit pages of DIR/nf4 they were read from; the adapters in
    float32. A plain LoRA's reference: the 16-bit base."""
    if settings.reference_kind != "qlora":
        return 2 * s.params + 4 * s.adapter
    return four_bit(s, settings) + (4 if cuda else 6) * s.other + 4 * s.adapter


def four_bit(s: Shape, settings: RunSettings) -> int:
    """The linear weights as bitsandbytes holds them: 4-bit codes and their block statistics."""
    per = 0.5 + (1 / 64 + 4 / (64 * 256) if settings.nf4.double_quant else 4 / 64)
    return int(s.linear * per)


def candidate_bytes(kind: str, s: Shape, streamed: bool, settings: RunSettings, cuda: bool) -> int:
    """One drift candidate's weights as it is held (models.checkpoints, eval.candidates)."""
    if kind in ("merged", "base"):
        return sixteen_bit(s, streamed)
    if kind == "original":  # resident: the edited weights copied out of the base's pages, which the edits read
        return sixteen_bit(s, streamed) + (0 if streamed or cuda else 2 * s.linear)
    if kind == "peft-nf4":  # its own 4-bit linears (the rest shared with the reference), one module's float32 sum in flight
        return four_bit(s, settings) + 4 * s.largest_linear
    if kind == "rtn":  # int8 levels beside DIR/merged's pages they were rounded from; streamed: rounded as each layer runs
        if streamed:
            return sixteen_bit(s, True) + 4 * s.largest_linear
        return 2 * s.other + s.linear + (0 if cuda else 2 * s.linear)
    # gptq, gptq-original: GPTQ layers as their levels (int8; int16 at 8 bits) and float32 scales, the
    # float32 weight of one layer in flight (quant.gptq_float); the rest as for a 16-bit checkpoint
    levels = 1 if settings.gptq.bits < 8 else 2
    return int(s.linear * (levels + 0.1)) + 4 * s.largest_linear + (2 * s.other if cuda else 6 * s.other)


def sixteen_bit(s: Shape, streamed: bool) -> int:
    if streamed:  # embeddings and head resident, one module's weights in flight (and its float32 upcast)
        return 2 * (s.other + s.layer) + 4 * s.largest_linear
    return 2 * s.params


def activations(s: Shape, batch: int, seq_len: int) -> int:
    return batch * seq_len * (ACTIVATION_H * s.hidden + ACTIVATION_I * s.intermediate) * 4


def logits(s: Shape, batch: int, seq_len: int) -> int:
    """A metrics chunk, the reference's float64 log-probabilities of a head projection's span and a
    candidate's float32 logits of it (three float32 spans), a block of the head's float32 upcast, the
    final hidden states of both."""
    span = min(head_positions(s.vocab), seq_len)
    return POSITIONS * s.vocab * LOGIT_BYTES + 3 * 4 * span * s.vocab + 4 * min(s.vocab * s.hidden, UPCAST_ELEMENTS) + 2 * batch * seq_len * s.hidden * 4


def _on(cuda: bool, base: int, parts: dict[str, int], host: int = 0, cache: int = 0) -> dict[str, dict[str, int]]:
    """Parts on the CPU, or on the GPU with the host keeping `host` bytes."""
    if not cuda:
        return {"cpu": {"base": base, **parts, **({"cache": cache} if cache else {})}}
    return {"cpu": {"base": base, "weights": host, **({"cache": cache} if cache else {})}, "cuda": {"base": CUDA_CONTEXT, **parts}}


def nf4_stage(s: Shape, settings: RunSettings, base: int, cuda: bool) -> StagePlan:
    """The base quantized tensor by tensor into DIR/nf4."""
    parts = {"weights": max(QUANTIZE_PER_ELEMENT * s.largest_linear, 2 * s.largest)}  # a tensor kept 16-bit is copied through
    size = four_bit(s, settings) + 2 * s.other
    return StagePlan("nf4", _on(cuda, base, parts), disk=size)


def merged_stage(name: str, s: Shape, settings: RunSettings, base: int, stream: str | None, cuda: bool) -> StagePlan:
    """The merge (one tensor at a time), then verify (the reference, DIR/merged for the logits check,
    one module of PEFT's merge in float32): the larger of the two."""
    streamed = stream is not None
    reference = reference_bytes(s, settings, cuda)
    verify = {"weights": reference + sixteen_bit(s, streamed) + EXPECTED_PER_ELEMENT * s.largest_linear, "activations": activations(s, 1, 128), "logits": logits(s, 1, 128)}
    merge = {"weights": max(MERGE_PER_ELEMENT * s.largest_linear, 4 * s.largest)}
    parts = verify if sum(verify.values()) > sum(merge.values()) else merge
    written = s.params * (4 if settings.merged_dtype == "float32" else 2)
    return StagePlan(name, _on(cuda, base, parts, _host_copy(s, stream)), disk=written, notes=[f"DIR/merged {'streamed' if streamed else 'resident'} for verify"])


def gptq_stage(name: str, s: Shape, settings: RunSettings, base: int, cuda: bool, cache_in_memory: int = 0) -> StagePlan:
    """GPTQModel: the model in 16 bits on the host, one layer, its Hessians and the calibration
    activations where it computes; with --search, also the reference, two candidates and the
    reference cache's bytes held in memory (`cache_in_memory`, on the host) for the whole search."""
    d = settings.data
    calibration = d.calibration_samples * d.seq_len * s.hidden * 4 * 2
    hessians = 4 * max(s.hidden, s.intermediate) ** 2 + 3 * 4 * s.hidden**2
    work = {"weights": 4 * s.layer, "activations": calibration + hessians}
    size = int(s.linear * (settings.gptq.bits / 8 + 0.05)) + 2 * s.other
    if cuda:
        devices = {"cpu": {"base": base + GPTQ_ENGINE, "weights": 2 * s.params}, "cuda": {"base": CUDA_CONTEXT, **work}}
    else:
        devices = {"cpu": {"base": base + GPTQ_ENGINE, "weights": 2 * s.params + work["weights"], "activations": work["activations"]}}
    if settings.search and name == "gptq":  # eval.search: the reference held throughout; its probe adds a GPTQ trial and the float merge
        reference = reference_bytes(s, settings, cuda)
        devices["cuda" if cuda else "cpu"]["search"] = reference + candidate_bytes("gptq", s, False, settings, cuda) + sixteen_bit(s, False)
        if cache_in_memory:
            devices["cpu"]["cache"] = cache_in_memory
        # on disk: every trial's checkpoint until the choice, and GPTQModel's offload
        return StagePlan(name, devices, disk=(MAX_RUNS + 1) * size, notes=["drift-budget search: the reference and two candidates"])
    return StagePlan(name, devices, disk=2 * size)  # the checkpoint, and GPTQModel's offload while it works


def drift_stage(s: Shape, settings: RunSettings, base: int, batch: int, stream: str | None, cache: tuple[int, int], cuda: bool) -> StagePlan:
    """The reference, the largest candidate beside it and a 16-bit head a candidate scored before it
    may leave (eval.drift.Scoring: their token statistics come last; one whose head differs from the
    reference's, an adapter training the head), one batch's activations and a logits
    chunk; `cache`: the reference cache's bytes (in memory, on disk), and as much again per layer for
    each candidate's final hidden states."""
    in_memory, on_disk = cache
    streamed = stream is not None
    reference = reference_bytes(s, settings, cuda)
    largest = max((candidate_bytes(k, s, streamed, settings, cuda) for k in settings.evaluated), default=0)
    parts = {"weights": reference + largest + 2 * s.vocab * s.hidden, "activations": activations(s, batch, settings.data.seq_len), "logits": logits(s, batch, settings.data.seq_len)}
    finals = (in_memory + on_disk) // s.layers * len(settings.evaluated)
    in_memory, on_disk = (in_memory + finals, on_disk) if in_memory else (in_memory, on_disk + finals)
    notes = [f"candidates {'streamed' if streamed else 'resident'}", f"reference cache {'in memory' if in_memory else 'on disk'}"]
    return StagePlan("drift", _on(cuda, base, parts, _host_copy(s, stream), in_memory), disk=on_disk, notes=notes)


def decode_weights(s: Shape) -> int:
    """The float32 weights a completed model's layers make once for decoding (models.decoding): its
    linear layers, and a head small enough to be upcast whole."""
    head = s.vocab * s.hidden
    return 4 * (s.linear + (head if head <= UPCAST_ELEMENTS else 0))


def _host_copy(s: Shape, stream: str | None) -> int:
    """On a GPU, a candidate streamed from host memory is held there in 16 bits."""
    return 2 * s.params if stream == "cpu" else 0
