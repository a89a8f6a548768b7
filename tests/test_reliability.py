"""Reliability: crashes lose no finished stage, --resume completes byte-identically, bad input is
refused with one line and exit 2, a full disk leaves earlier outputs intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_base, make_qlora_adapter, make_tokenizer, one_line_error

# a model big enough that each stage takes a moment, so a kill lands inside it
MID = dict(hidden_size=384, intermediate_size=1152, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2)
ARGS = ["--group-size", "64", "--seq-len", "64", "--calibration-samples", "16", "--eval-samples", "6"]
CHECKPOINT_FILES = ("merged/model.safetensors", "merged/config.json", "gptq/model.safetensors", "gptq/config.json", "gptq/quantize_config.json")


def qmerge_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qmerge.cli", *args]


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    root = tmp_path_factory.mktemp("mid")
    base = make_base(root / "base", **MID)
    adapter = make_qlora_adapter(base, root / "adapter")
    out = root / "uninterrupted"
    subprocess.run(qmerge_cmd("run", "--base", str(base), "--adapter", str(adapter), "--out", str(out), *ARGS), check=True, capture_output=True, timeout=900)
    return base, adapter, out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["merged", "gptq", "drift"])
def test_sigkill_then_resume_is_byte_identical(mid, tmp_path, stage):
    base, adapter, reference_out = mid
    out = tmp_path / "out"
    args = ["run", "--base", str(base), "--adapter", str(adapter), "--out", str(out), *ARGS]
    proc = subprocess.Popen(qmerge_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list(out.glob(f".{stage}.partial-*")):
        assert proc.poll() is None, f"the run ended before the {stage} stage was seen"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifests" / f"{stage}.json").exists(), "the kill landed after the stage finished"
    resumed = subprocess.run(qmerge_cmd(*args, "--resume"), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for earlier in ("merged", "gptq", "drift")[: ("merged", "gptq", "drift").index(stage)]:
        assert f"{earlier}: reused (manifest verified)" in resumed.stdout
    for rel in CHECKPOINT_FILES:
        assert (out / rel).read_bytes() == (reference_out / rel).read_bytes(), rel
    assert not list(out.glob(".*"))  # the killed run's partial stage is gone


def test_resume_reuses_verified_stages_and_redoes_changed_ones(tiny_base, tiny_adapter, tmp_path, cli, monkeypatch):
    """Unchanged, a resumed run reuses every stage; a stage whose files changed is redone; after an
    upgrade (here: another transformers version string) nothing the new stack would make differently
    is reused."""
    from qmerge import pipeline
    from qmerge.report.schema import library_versions

    args = ["run", "--base", tiny_base, "--adapter", tiny_adapter, "--out", tmp_path / "out", "--seq-len", "64", "--calibration-samples", "2",
            "--eval-samples", "2", "--skip-gptq", "--candidates", "merged"]
    assert cli(*args).returncode == 0
    again = cli(*args, "--resume")
    assert again.returncode == 0 and "merged: reused" in again.stdout and "drift: reused" in again.stdout
    from qmerge.quant.gptq import SCRATCH_PREFIX

    killed = tmp_path / "out" / f"{SCRATCH_PREFIX}k1lled"  # what a run killed inside GPTQModel leaves
    (killed / "offload").mkdir(parents=True)
    merged = tmp_path / "out" / "merged" / "model.safetensors"
    intact = merged.read_bytes()
    merged.write_bytes(b"damaged")
    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0 and "merged: reused" not in resumed.stdout
    assert merged.read_bytes() == intact
    assert not killed.exists()
    monkeypatch.setattr(pipeline, "library_versions", lambda: {**library_versions(), "transformers": "5.99.0"})
    upgraded = cli(*args, "--resume")
    assert upgraded.returncode == 0 and "reused" not in upgraded.stdout, upgraded.stdout
    assert json.loads((tmp_path / "out" / "manifests" / "merged.json").read_text())["produced_by"]["versions"]["transformers"] == "5.99.0"


def test_calibration_order_is_part_of_the_key():
    """GPTQ's result depends on the order of its calibration windows: the digest the GPTQ stage keys on does too."""
    from qmerge.io import text

    windows = torch.arange(12).view(3, 4)
    assert text.stream_sha256(windows) != text.stream_sha256(windows.flip(0))


def one_line_exit_2(result, *words: str) -> str:
    return one_line_error(result, 2, *words)


@pytest.fixture
def broken(tiny_base, tiny_adapter, tmp_path):
    """Copies of the tiny base and adapter to damage one way or another."""
    import shutil

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(tiny_base, base)
    shutil.copytree(tiny_adapter, adapter)
    return base, adapter


@pytest.fixture
def run_cli(cli):
    def run(base: Path, adapter: Path, out: Path, *extra: str):
        return cli("run", "--base", base, "--adapter", adapter, "--out", out, "--group-size", "32", *extra)

    return run


def _set_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _scale_tensor(adapter: Path, factor: float) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key] * factor
    save_file(tensors, path)


NORM = "model.layers.1.post_attention_layernorm.weight"
BAD_INPUTS = {
    "adapter_config_missing": (lambda b, a: (a / "adapter_config.json").unlink(), ["adapter_config.json is missing"]),
    "adapter_weights_missing": (lambda b, a: (a / "adapter_model.safetensors").unlink(), ["adapter_model.safetensors is missing"]),
    "invalid_json": (lambda b, a: (a / "adapter_config.json").write_text("{not json"), ["not valid JSON"]),
    "truncated_adapter": (lambda b, a: (a / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes()[:300]), ["cannot read"]),
    "truncated_base": (lambda b, a: (b / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes()[:5000]), ["cannot read"]),
    "nan_weights": (lambda b, a: _scale_tensor(a, float("nan")), ["NaN or Inf"]),
    "zero_rank": (lambda b, a: _set_config(a, r=0), ["r = 0 must be positive"]),
    "negative_alpha": (lambda b, a: _set_config(a, lora_alpha=-16), ["lora_alpha = -16 must be positive"]),
    "pickle_base": (lambda b, a: (torch.save(load_file(b / "model.safetensors"), b / "pytorch_model.bin"), (b / "model.safetensors").unlink()), ["--allow-pickle"]),
    "remote_code": (lambda b, a: (b / "config.json").write_text(json.dumps({**json.loads((b / "config.json").read_text()), "auto_map": {"AutoModelForCausalLM": "m.M"}})), ["--trust-remote-code"]),
    "layer_replication": (lambda b, a: _set_config(a, layer_replication=[[0, 2]]), ["layer replication (layer_replication) is not supported"]),
    "dora_without_magnitudes": (lambda b, a: _set_config(a, use_dora=True), ["lacks lora_magnitude_vector", "use_dora"]),
    "missing_target": (lambda b, a: _rename_module(a, "q_proj", "qq_proj"), ["qq_proj", "base does not have"]),
    "vocabulary": (lambda b, a: make_tokenizer(a, 700), ["700 tokens", "vocabulary is 512"]),
    # a tensor the model expects, missing: transformers would initialise it at random (and only warn)
    "missing_base_tensor": (lambda b, a: _edit_base(b, {NORM: None}), ["lacks tensor", NORM]),
    # a layer whose output overflows float32 (finite weights): NaN logits would make every metric NaN
    "overflowing_layer": (lambda b, a: _edit_base(b, {"model.layers.0.mlp.up_proj.weight": 1e10, "model.layers.0.mlp.down_proj.weight": 1e39}),
                          ["reference", "non-finite logits"]),
}


def _edit_base(base: Path, factors: dict[str, float | None]) -> None:
    """Scale tensors of the base by their factor, or remove them (factor None)."""
    path = base / "model.safetensors"
    tensors = load_file(path)
    for key, factor in factors.items():
        if factor is None:
            del tensors[key]
        else:
            tensors[key] = (tensors[key].float() * factor).to(tensors[key].dtype)
    save_file(tensors, path, metadata={"format": "pt"})


def _rename_module(adapter: Path, old: str, new: str) -> None:
    path = adapter / "adapter_model.safetensors"
    save_file({k.replace(old, new): v for k, v in load_file(path).items()}, path)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_exit_2_nothing_left(broken, tmp_path, case, run_cli):
    base, adapter = broken
    damage, words = BAD_INPUTS[case]
    damage(base, adapter)
    out = tmp_path / "out"
    one_line_exit_2(run_cli(base, adapter, out), *words)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_allow_pickle_reads_a_pickled_base(broken, tmp_path, run_cli):
    base, adapter = broken
    BAD_INPUTS["pickle_base"][0](base, adapter)
    result = run_cli(base, adapter, tmp_path / "out", "--allow-pickle", "--skip-gptq", "--seq-len", "64", "--eval-samples", "4", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["final"]["kld_mean"] < 1e-3


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--bits", "5"], ["--bits 5"]),
        (["--calibration", "{empty}"], ["calibration text is empty"]),
        (["--calibration-samples", "100000"], ["100000 were asked for"]),
        (["--target", "vllm", "--no-sym", "--bits", "3"], ["--target vllm cannot load", "3-bit", "asymmetric"]),
        (["--calibration", "{same}", "--eval", "{same}"], ["also occur in the calibration set"]),
    ],
)
def test_bad_settings_and_data(tiny_base, tiny_adapter, tmp_path, extra, words, run_cli):
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "same.txt").write_text(" ".join(f"word{i}" for i in range(4000)))
    extra = [e.format(empty=tmp_path / "empty.txt", same=tmp_path / "same.txt") for e in extra]
    out = tmp_path / "out"
    one_line_exit_2(run_cli(tiny_base, tiny_adapter, out, "--seq-len", "64", *extra), *words)
    assert not out.exists()


@pytest.mark.slow
def test_disk_full_keeps_earlier_outputs(tiny_base, tiny_adapter, tmp_path, run_cli):
    """A size-limited tmpfs holds one run's outputs but not a second merged checkpoint beside them."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    args = ["--skip-gptq", "--seq-len", "64", "--eval-samples", "4", "--merged-dtype", "float32"]
    probe = tmp_path / "probe"
    assert run_cli(tiny_base, tiny_adapter, probe, *args).returncode == 0
    size = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    merged = sum(p.stat().st_size for p in (probe / "merged").glob("*") if p.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + merged // 2}", "tmpfs", str(mount)], check=True)
    try:
        out = mount / "out"
        assert run_cli(tiny_base, tiny_adapter, out, *args).returncode == 0
        before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        line = one_line_exit_2(run_cli(tiny_base, tiny_adapter, out, *args, "--overwrite", "--merged-dtype", "bfloat16"), "no space left")
        assert "intact" in line or "memory plan" in line  # a write that fails, or the plan refusing before any (both keep the outputs)
        after = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert after == before and not list(out.glob(".*"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_adapter_naming_another_base_warns_and_continues(broken, tmp_path, run_cli):
    base, adapter = broken
    _set_config(adapter, base_model_name_or_path="someone/other-model")
    result = run_cli(base, adapter, tmp_path / "out", "--skip-gptq", "--seq-len", "64", "--eval-samples", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "qmerge: warning: the adapter names base 'someone/other-model'" in result.stderr


def test_a_forked_worker_writes_through_gptqmodel_console_after_the_parent_imported_it():
    """GPTQModel's console (logbar) funnels stdout through a writer thread started at import; a forked
    stage worker has no such thread and hung at its first flush (the GPTQ stage of `qmerge demo` under
    the AVX2 reproduction, idle for 10 minutes). The worker now starts a writer of its own."""
    import signal

    from qmerge.io import isolated
    from qmerge.models.engine import gptqmodel

    gptqmodel()

    def flush() -> str:
        from logbar import logbar

        signal.alarm(60)  # a hang kills the worker: run() then raises instead of the test hanging
        logbar._flush_stream()
        signal.alarm(0)
        return "flushed"

    assert isolated.run(flush, "fork")[0] == "flushed"


def _private_dirty_kb() -> int:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise AssertionError("no Private_Dirty in smaps_rollup")


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux's smaps_rollup")
def test_a_forked_worker_collecting_garbage_leaves_the_parents_pages_shared():
    """A collection in a forked worker does not copy the pages of the parent's objects (gc.freeze
    around the fork): 400k parent objects cost the worker under 8 MB of pages of its own; unfrozen,
    its collection copied 48 MB of them (measured 2026-11-30)."""
    import gc

    from qmerge.io import isolated

    objects = [{"i": i} for i in range(400_000)]

    def collect() -> int:
        before = _private_dirty_kb()
        gc.collect()
        return _private_dirty_kb() - before

    grown_kb = isolated.run(collect, "fork")[0]
    assert grown_kb < 8 * 1024, f"the worker copied {grown_kb / 1024:.0f} MB of the parent's pages"
    assert len(objects) == 400_000 and not gc.get_freeze_count()  # the parent collects as before
