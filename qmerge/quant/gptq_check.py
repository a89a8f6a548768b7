"""What the GPTQ stage checks before it hands a checkpoint over: GPTQModel quantized exactly the layers
its model definition lists (qmerge.quant.structure, the set every size and the RTN row use), each
stored layer dequantizes to a weight close to the merged one it came from (a layout error, such as
fused parts in the wrong order, is far off), and the checkpoint loads without a missed or ignored
tensor and runs to finite logits in the loader a user would use: transformers, or GPTQModel where
transformers has no place for a quantized layer (fused MoE experts)."""

from __future__ import annotations

from pathlib import Path

import torch

from qmerge.errors import QmergeError, VerifyError
from qmerge.io.checkpoint import LazyCheckpoint
from qmerge.models.engine import gptqmodel
from qmerge.models.precision import native
from qmerge.models.loading import from_pretrained
from qmerge.quant import dynamic
from qmerge.quant.gptq_float import quantized_layers
from qmerge.quant.gptq_weights import dequantize, layer_tensors
from qmerge.quant.structure import GPTQLayers
from qmerge.settings import GPTQSettings

LOAD_CHECK_TOKENS = 32  # tokens of a calibration window check_loads runs

MAX_REL_ERROR = 1.0  # ‖dequantized − merged‖ / ‖merged‖ per layer: 2-bit GPTQ stays well under it, unrelated rows land near √2


def check_layers(out_dir: Path, merged_dir: Path, layers: GPTQLayers, gptq: GPTQSettings, overrides: dict | None = None) -> None:
    """The checkpoint's quantized layers are the expected ones (but those `overrides`, GPTQModel's
    `dynamic`, keep 16-bit), each close to its merged weight at the bits it was given."""
    base = dynamic.base_setting(gptq)
    setting = {name: dynamic.resolve(overrides, name, base) for name in layers.shapes}
    stored, expected = set(quantized_layers(out_dir)), {name for name, s in setting.items() if s is not dynamic.KEEP}
    if stored != expected:
        odd = sorted(stored ^ expected)[0]
        said = "quantized" if odd in stored else "did not quantize"
        raise VerifyError(f"GPTQModel {said} {odd}, against its own model definition; the GPTQ checkpoint is not handed over (report a bug with the architecture)")
    ckpt, merged = LazyCheckpoint.open(out_dir), LazyCheckpoint.open(merged_dir)
    for name in sorted(expected):
        weight, reference = dequantize(layer_tensors(ckpt, name), setting[name].bits), merged.get(f"{name}.weight").float()
        # float32 norms: finite exactly when every weight is (each is at most 65504 × 256, so their
        # squares cannot sum past float32's range), ten times cheaper than torch.isfinite on the CPU
        if not torch.isfinite(torch.linalg.norm(weight)):
            raise QmergeError(f"the GPTQ checkpoint's {name} holds non-finite weights: the merged layer's values exceed what float16 scales hold (65504 per level); it is not handed over")
        rel = (torch.linalg.norm(weight - reference) / torch.linalg.norm(reference)).item()
        if not rel < MAX_REL_ERROR:
            raise VerifyError(f"the GPTQ checkpoint's {name} is not the merged layer quantized (relative error {rel:.3g}); it is not handed over (report a bug with the architecture)")


def check_loads(out_dir: Path, window: torch.Tensor, device: torch.device, loader: str, trust_remote_code: bool = False) -> str:
    """Load the checkpoint as a user would (`loader`: transformers or gptqmodel) and run the first
    LOAD_CHECK_TOKENS of a window through every layer; returns the class of the kernel it chose. A few
    tokens run every kernel; the whole 512-token window took 2.6 s against 0.9 s on the demo (CPU),
    most of the GPTQ stage's overhead over bare GPTQModel (BENCHMARKS.md)."""
    # where bf16 is not native the check runs in float32, as GPTQ did (oneDNN limited to AVX2 aborted the process in bf16)
    dtype = {} if native(torch.bfloat16, device) else {"dtype": torch.float32}
    if loader == "transformers":
        model = from_pretrained(out_dir, "the GPTQ checkpoint, loaded by transformers,", VerifyError, device_map={"": device}, trust_remote_code=trust_remote_code, **dtype)
    else:
        model = gptqmodel().GPTQModel.load(str(out_dir), device=str(device), trust_remote_code=trust_remote_code, **dtype).model
    with torch.inference_mode():
        logits = model(input_ids=window[None, :LOAD_CHECK_TOKENS].to(device)).logits
    if not torch.isfinite(logits).all():
        raise VerifyError(f"the GPTQ checkpoint computes non-finite logits in {loader} ({logits.dtype}); it is not handed over: try --group-size 32 or --bits 8, or score it with --skip-gptq")
    kernels = {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("gptqmodel")}
    return ",".join(sorted(kernels))
