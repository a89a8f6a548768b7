"""Every setting of a run as one typed object, validated before any heavy work starts.

Defaults are the QLoRA recipe for the NF4 base (nf4, double quantization, blocksize 64, bf16 compute)
and the portable GPTQ profile (format gptq v1, 4-bit, group 128 where it divides every quantized
layer (else 64 or 32: group size auto), sym, no act-order) that transformers, vLLM, SGLang and TGI
all load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from qmerge.errors import QmergeError

VERSION = "0.1.0"  # of qmerge: part of every stage key

DTYPES = ("bfloat16", "float16", "float32")
# Rows of the drift report (qmerge.eval.candidates says what each is); the noise floor is added
# whenever the training compute dtype is not float32.
CANDIDATE_KINDS = ("merged", "original", "peft-nf4", "rtn", "gptq", "gptq-original", "base")
DEFAULT_CANDIDATES = tuple(k for k in CANDIDATE_KINDS if k != "gptq-original")  # a second GPTQ run only when asked


def checkpoint_kind(spec: str) -> str:
    """The candidate kind of one `--checkpoint NAME=DIR_OR_HUB_ID` (a checkpoint made elsewhere): "checkpoint:NAME"."""
    name, sep, where = spec.partition("=")
    if not sep or not name.strip() or not where.strip():
        raise QmergeError(f"--checkpoint {spec!r} must be NAME=DIR_OR_HUB_ID, e.g. --checkpoint theirs=TheBloke/model-GPTQ")
    return f"checkpoint:{name.strip()}"


def reference_kind(merge_into: str) -> str:
    """The model the adapter was trained on follows the merge target: a QLoRA adapter ("qlora") merges
    into the 4-bit weights it saw, a plain LoRA ("lora") into the 16-bit ones."""
    return "qlora" if merge_into == "nf4" else "lora"


@dataclass(frozen=True)
class NF4Settings:
    """bitsandbytes 4-bit settings used at training time (BitsAndBytesConfig's bnb_4bit_* fields)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "bfloat16"
    quant_storage: str = "uint8"
    skip_modules: tuple[str, ...] = ()  # llm_int8_skip_modules / modules_to_not_convert

    def validate(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise QmergeError(f"--quant-type {self.quant_type!r} is not a bitsandbytes 4-bit type; use nf4 or fp4")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise QmergeError(f"--nf4-blocksize {self.blocksize} is not one bitsandbytes supports; use 64 (QLoRA's) or a power of two 32..4096")
        if self.compute_dtype not in DTYPES:
            raise QmergeError(f"--compute-dtype {self.compute_dtype!r} is unknown; use one of {', '.join(DTYPES)}")
        if self.quant_storage not in ("uint8", "bfloat16", "float16", "float32"):
            raise QmergeError(f"--quant-storage {self.quant_storage!r} is unknown; use uint8 (the default), bfloat16, float16 or float32")


@dataclass(frozen=True)
class GPTQSettings:
    """GPTQModel's QuantizeConfig, restricted to what servers load."""

    bits: int = 4
    group_size: int | str = "auto"  # auto: the largest of 128, 64, 32 dividing every quantized layer's in_features (qmerge.quant.servers)
    desc_act: bool = False
    sym: bool = True
    damp: float = 0.01
    target: str = "any"  # the server the checkpoint is for: any, transformers, vllm or sglang

    def validate(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise QmergeError(f"--bits {self.bits} is not supported; use 2, 3, 4 or 8")
        if self.group_size == "auto":
            pass
        elif not isinstance(self.group_size, int) or self.group_size != -1 and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise QmergeError(f"--group-size {self.group_size} is not supported; use auto (the default), -1 (per channel) or a power of two >= 16 such as 32, 64 or 128")
        if self.target not in ("any", "transformers", "vllm", "sglang"):
            raise QmergeError(f"--target {self.target!r} is unknown; use any, transformers, vllm or sglang")
        if not 0.0 < self.damp < 1.0:
            raise QmergeError(f"--damp {self.damp} is out of range; use a fraction such as 0.01 (GPTQ's default) up to 0.1")


@dataclass(frozen=True)
class DataSettings:
    """Where calibration and eval text come from and how it is cut into token windows."""

    calibration: str = "stdlib"
    calibration_samples: int = 128
    eval: tuple[str, ...] = ("stdlib",)  # one report section per eval set
    eval_samples: int = 32
    seq_len: int = 512
    allow_overlap: bool = False  # evaluate on windows GPTQ was calibrated on (the overlap is reported)
    eval_batch: int = 0  # eval windows per forward; 0: 1 on CPU (no gain, more memory), on a GPU what the memory plan fits
    prompts: str | None = None  # a .txt (one prompt a line) or .jsonl (prompt or chat messages) file; None: the first eval windows
    samples: int = 4  # prompts completed greedily side by side in the report (0: none)
    sample_tokens: int = 32  # new tokens per completion


    def validate(self) -> None:
        if not self.eval:
            raise QmergeError("--eval names no eval set; give one or more sources, comma-separated (e.g. stdlib,wikitext2-local)")
        if len(set(self.eval)) != len(self.eval):
            raise QmergeError(f"--eval names a set twice ({','.join(self.eval)}); list each eval set once")
        if self.seq_len < 16:
            raise QmergeError(f"--seq-len {self.seq_len} is too short; use at least 16 (512 or 2048 are usual)")
        for flag, n in (("--calibration-samples", self.calibration_samples), ("--eval-samples", self.eval_samples)):
            if n < 1:
                raise QmergeError(f"{flag} {n} must be at least 1")
        if self.eval_batch < 0:
            raise QmergeError(f"--eval-batch {self.eval_batch} must be 0 (automatic) or more windows per forward")
        if self.samples < 0 or self.sample_tokens < 1:
            raise QmergeError(f"--samples {self.samples} / --sample-tokens {self.sample_tokens}: use 0 or more prompts and at least 1 token")
        if self.prompts is not None and not Path(self.prompts).expanduser().is_file():
            raise QmergeError(f"--prompts {self.prompts} is not a file; pass a .txt (one prompt a line) or .jsonl file")


@dataclass(frozen=True)
class RunSettings:
    """One `qmerge run`: inputs, output directory and the settings of every stage."""

    base: str
    adapter: tuple[str, ...]  # DIR_OR_HUB_ID[:WEIGHT] each; several are merged as Σ weight·Δ
    out: Path
    nf4: NF4Settings = field(default_factory=NF4Settings)
    gptq: GPTQSettings = field(default_factory=GPTQSettings)
    data: DataSettings = field(default_factory=DataSettings)
    merged_dtype: str = "bfloat16"
    merge_into: str = "nf4"  # nf4: the weights as trained (QLoRA); original: the 16-bit weights (a plain LoRA)
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False
    resume: bool = False
    allow_pickle: bool = False  # read .bin weights (pickle runs code: only for trusted files)
    trust_remote_code: bool = False
    skip_gptq: bool = False
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES  # rows of the drift report (--skip-gptq drops those on the GPTQ grid)
    verify_inputs: bool = False  # hash every input and stage file again instead of trusting (path, size, mtime)
    stream: str = "auto"  # candidates streamed a layer at a time: auto (when the memory plan says they do not fit), always, never
    max_kld: float | None = None  # quality budgets on the final checkpoint: exit 3 when exceeded
    max_ppl_ratio: float | None = None
    search: bool = False  # find the smallest servable GPTQ checkpoint within max_kld (qmerge.eval.search)
    checkpoints: tuple[str, ...] = ()  # NAME=DIR_OR_HUB_ID each: checkpoints made elsewhere (GPTQ, AWQ, merged) scored as candidates too
    revision: str | None = None  # the base's hub revision (branch, tag or commit); adapters pin theirs as ID@REVISION
    # the nf4 fields the user set (flag or recipe): a pre-quantized base decides the others, and
    # refuses these when they disagree with it
    nf4_given: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # one adapter string (the API, recipes, older callers) or a list (recipes, repeated --adapter)
        object.__setattr__(self, "adapter", (self.adapter,) if isinstance(self.adapter, str) else tuple(self.adapter))
        object.__setattr__(self, "checkpoints", (self.checkpoints,) if isinstance(self.checkpoints, str) else tuple(self.checkpoints))

    def validate(self) -> None:
        self.nf4.validate()
        self.gptq.validate()
        self.data.validate()
        if not self.adapter:
            raise QmergeError("--adapter is required (or set 'adapter:' in the recipe)")
        if self.merged_dtype not in DTYPES:
            raise QmergeError(f"--merged-dtype {self.merged_dtype!r} is unknown; use one of {', '.join(DTYPES)}")
        if self.merge_into not in ("nf4", "original"):
            raise QmergeError(f"--merge-into {self.merge_into!r} is unknown; use nf4 (the weights a QLoRA adapter was trained on) or original (a plain LoRA)")
        if self.stream not in ("auto", "always", "never"):
            raise QmergeError(f"--stream {self.stream!r} is unknown; use auto (when the memory plan needs it), always or never")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise QmergeError(f"--device {self.device!r} is unknown; use auto, cpu, cuda or cuda:N")
        unknown = sorted(set(self.candidates) - set(CANDIDATE_KINDS))
        if unknown:
            raise QmergeError(f"--candidates {unknown[0]!r} is unknown; choose from {','.join(CANDIDATE_KINDS)}")
        names = [kind.removeprefix("checkpoint:") for kind in self.checkpoint_kinds]
        if len(set(names)) != len(names):
            raise QmergeError(f"--checkpoint names a candidate twice ({', '.join(names)}); give each checkpoint its own NAME")
        if self.final_kind not in (*self.candidates, *self.checkpoint_kinds):
            raise QmergeError(f"--candidates must include {self.final_kind}, the checkpoint this run delivers (budgets apply to it)")
        if self.search and (self.max_kld is None or self.skip_gptq or "gptq" not in self.candidates):
            raise QmergeError("--search needs a budget to search for and the gptq row: give --max-kld X, without --skip-gptq")
        for flag, value in (("--max-kld", self.max_kld), ("--max-ppl-ratio", self.max_ppl_ratio)):
            if value is not None and value <= 0:
                raise QmergeError(f"{flag} {value} must be positive")

    @property
    def checkpoint_kinds(self) -> tuple[str, ...]:
        return tuple(checkpoint_kind(spec) for spec in self.checkpoints)

    @property
    def final_kind(self) -> str:
        """The checkpoint budgets apply to: gptq, merged with --skip-gptq, or, when that is not among
        the candidates (qmerge eval of checkpoints made elsewhere), the first --checkpoint."""
        own = "merged" if self.skip_gptq else "gptq"
        return self.checkpoint_kinds[0] if own not in self.candidates and self.checkpoints else own

    @property
    def reference_kind(self) -> str:
        return reference_kind(self.merge_into)

    @property
    def floor_dtype(self) -> str:
        """The dtype of the noise-floor row: the reference's 4-bit layers in the training compute
        dtype; a plain LoRA's reference has no 4-bit layers, hence no floor (float32)."""
        return self.nf4.compute_dtype if self.reference_kind == "qlora" else "float32"

    @property
    def evaluated(self) -> tuple[str, ...]:
        """The candidate kinds this run evaluates, in report order."""
        dropped = ("gptq", "gptq-original", "rtn") if self.skip_gptq else ()
        return (*(k for k in CANDIDATE_KINDS if k in self.candidates and k not in dropped), *self.checkpoint_kinds)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d
