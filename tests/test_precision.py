"""The compute path decided from what the machine can do (qmerge.models.precision): the switch that
forces the non-native path, the same decision as oneDNN's under the AVX2 reproduction, the demo's
fine-tune and the noise floor on that path end to end on the tiny model, and the float32 emulation
of bf16 against real bf16 arithmetic where the CPU has it."""

from __future__ import annotations

import json
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch

from qmerge import demo
from qmerge.eval.drift import NOISE_FLOOR, evaluate
from qmerge.eval.metrics import chunk_stats
from qmerge.merge.adapter import load_mix
from qmerge.models.precision import EMULATE_ENV, computing_in, native, training_dtype
from qmerge.models.reference import load_reference
from qmerge.report.markdown import noise_floor_words
from qmerge.settings import NF4Settings

CPU = torch.device("cpu")
NATIVE_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_the_switch_forces_the_non_native_path(monkeypatch):
    assert native(torch.bfloat16, CPU) == NATIVE_BF16 and native(torch.float32, CPU)
    monkeypatch.setenv(EMULATE_ENV, "1")
    assert not native(torch.bfloat16, CPU) and not native(torch.float16, CPU) and native(torch.float32, CPU)
    assert training_dtype(CPU) == torch.float32


def test_the_avx2_reproduction_reads_as_no_native_bf16():
    """oneDNN's ISA cap (with torch's own) makes the decision what an AVX2-only CPU's would be."""
    code = "import torch; from qmerge.models.precision import native; print(native(torch.bfloat16, torch.device('cpu')))"
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.fixture(scope="module")
def float32_adapter(tiny_base, tmp_path_factory):
    """The demo's fine-tune on the forced non-native path, two short steps on the tiny model."""
    directory = tmp_path_factory.mktemp("demo") / "adapter"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(EMULATE_ENV, "1")
        mp.setattr(demo, "TRAIN", {**demo.TRAIN, "steps": 2, "batch": 1, "seq_len": 32})
        demo.train_adapter(tiny_base, directory, echo=False)
    return directory


def test_demo_fine_tune_computes_in_float32_and_records_it(float32_adapter):
    from safetensors.torch import load_file

    assert json.loads((float32_adapter / demo.TRAINING_FILE).read_text()) == {"compute_dtype": "float32"}
    assert demo.recorded_settings(float32_adapter) == {"compute_dtype": "float32"}
    weights = load_file(float32_adapter / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any("lora_B" in k and w.abs().max() > 0 for k, w in weights.items())  # PEFT starts lora_B at zero: it trained


def test_noise_floor_emulated_end_to_end(tiny_base, float32_adapter, monkeypatch):
    """The drift stage on the forced path: the floor is the reference with bf16 roundings, close to
    the reference; each window's floor differs from that window's reference forward, so the
    reference computed in float32 again after each floor pass (else the second window's KLD is 0)."""
    monkeypatch.setenv(EMULATE_ENV, "1")
    reference = load_reference(tiny_base, load_mix((str(float32_adapter),)), NF4Settings(), CPU)
    windows = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    floor = evaluate(reference, {}, [windows], "bfloat16", show_progress=False)[0]["metrics"][NOISE_FLOOR]
    assert 0 < floor["kld_mean"] < 1e-3 and floor["top1_agreement"] > 0.95, floor
    assert all(k > 0 for k in floor["per_window"]["kld"]), floor["per_window"]


def test_report_says_the_floor_was_emulated():
    rows = {NOISE_FLOOR: {"kind": "noise-floor", "compute_dtype": "bfloat16", "arithmetic": "emulated"}}
    assert "emulated: float32 products of bfloat16-rounded inputs" in noise_floor_words({"candidates": rows})
    assert "No noise-floor row: the training compute dtype is float32" in noise_floor_words({"candidates": {}})


@pytest.mark.skipif(not NATIVE_BF16, reason="needs a CPU with native bf16 to compare with")
def test_emulation_matches_real_bf16_arithmetic(tiny_base, tiny_adapter, monkeypatch):
    """Tolerances: a 4-bit layer's emulated output is within one bf16 step (2^-7 relative) of
    bitsandbytes' real bf16 output everywhere and equal in ≥ 99% of elements (only the order of the
    float32 sums differs); over the model, the emulated floor's mean KLD is within 5% of the real
    one, and the two floors are ≥ 100× closer to each other than to the reference."""
    reference = load_reference(tiny_base, load_mix((str(tiny_adapter),)), NF4Settings(), CPU)
    layer = next(m for m in reference.modules() if isinstance(m, bnb.nn.Linear4bit))
    x = torch.randn(256, layer.in_features, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = reference(input_ids=ids).logits
        with computing_in(reference, torch.bfloat16):
            real, real_layer = reference(input_ids=ids).logits, layer(x)
        monkeypatch.setenv(EMULATE_ENV, "1")
        with computing_in(reference, torch.bfloat16):
            emulated, emulated_layer = reference(input_ids=ids).logits, layer(x)
    assert ((emulated_layer - real_layer).abs() <= 2.0**-7 * real_layer.abs()).all()
    assert (emulated_layer != real_layer).float().mean() <= 0.01
    kld = lambda p, q: chunk_stats(p, q, ids[:, 1:]).kld.mean().item()  # noqa: E731
    p, q, r = ref[:, :-1], real[:, :-1], emulated[:, :-1]
    assert kld(p, q) > 0 and abs(kld(p, r) - kld(p, q)) <= 0.05 * kld(p, q)
    assert kld(q, r) <= 0.01 * kld(p, q)
