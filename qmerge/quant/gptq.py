"""GPTQ with GPTQModel (the maintained successor of AutoGPTQ, and the loader transformers 5 and
optimum 2 use for GPTQ), writing the portable profile: format gptq (v1), int32 packing, in the
layout of the model it came from, checked to load and run before it is handed over."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig

from qmerge.errors import QmergeError
from qmerge.io.atomic import PARTIAL
from qmerge.io.progress import Progress
from qmerge.models.architecture import transformers_holds
from qmerge.models.engine import gptqmodel, transformers_unpatched
from qmerge.quant import structure
from qmerge.quant.gptq_check import check_layers, check_loads
from qmerge.quant.layout import fuse
from qmerge.quant.servers import resolve_group_size
from qmerge.models.precision import native
from qmerge.settings import GPTQSettings

LOG_NAME = "quantize.log"
SCRATCH_PREFIX = f".gptq-scratch{PARTIAL}"  # GPTQModel's scratch beside the output: a partial's name, so clean_partials removes a killed run's


def quantize(
    merged_dir: Path, out_dir: Path, calibration: torch.Tensor, gptq: GPTQSettings, device: torch.device, verbose: bool = False, trust_remote_code: bool = False,
    dynamic: dict | None = None, gptaq: float = 0.0,
) -> list[dict]:
    """Quantize `merged_dir` into `out_dir`, in the layout of the model it came from, checked as
    qmerge.quant.gptq_check says before it is handed over; returns the quantizer's per-module log
    (layer, module, loss, samples, damp, time), which is also kept as quant_log.csv. `dynamic`:
    GPTQModel's per-module overrides (checked by qmerge.quant.dynamic; such a checkpoint is checked
    in GPTQModel's loader, as transformers' ignores them); `gptaq`: GPTAQ's alpha (0: off, plain
    GPTQ), which makes each layer's update also correct the error that the layers quantized before it
    left in its inputs: free in bytes, the checkpoint is plain GPTQ v1."""
    merged_dir, out_dir = Path(merged_dir).resolve(), Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = structure.of_checkpoint(merged_dir, trust_remote_code)
    gptq, _ = resolve_group_size(layers.shapes, gptq)  # group size auto: decided on the layers GPTQ quantizes
    hf_config = AutoConfig.from_pretrained(merged_dir, trust_remote_code=trust_remote_code)
    loader = "gptqmodel" if dynamic else gptq_loader(hf_config, layers, trust_remote_code)
    if dynamic and layers.fused:  # its patterns would name the parts GPTQModel splits, the checkpoint stores them fused
        raise QmergeError(f"per-module overrides are not supported on a model with fused layers ({next(iter(layers.fused))}); run without --search")
    with transformers_unpatched(hf_config.model_type), _quiet(out_dir / LOG_NAME, verbose) as progress_stream, _scratch_cwd(out_dir.parent) as scratch:
        engine = gptqmodel()
        config = engine.QuantizeConfig(
            bits=gptq.bits, group_size=gptq.group_size, desc_act=gptq.desc_act, sym=gptq.sym, damp_percent=gptq.damp, format="gptq",
            dynamic=dynamic or None, gptaq={"alpha": gptaq, "device": str(device)} if gptaq else None, offload_to_disk_path=str(scratch / "offload"),
        )
        emulate = device.type == "cpu" and not native(torch.bfloat16, device)
        compute = {"dtype": torch.float32} if emulate else {}  # GPTQModel's CPU default is bf16
        model = engine.GPTQModel.load(str(merged_dir), config, device=str(device), trust_remote_code=trust_remote_code, **compute)
        rows = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in calibration]
        with _layer_progress(model.model.get_submodule(layers.layers_node), progress_stream):
            model.quantize(rows, batch_size=1)
        model.save(str(out_dir))
        del model
        if emulate:
            _float32_stored_as_bf16(out_dir)
        _scrub_local_paths(out_dir)
        fuse(out_dir, layers.fused, gptq.bits)
        check_layers(out_dir, merged_dir, layers, gptq, dynamic)
        check_loads(out_dir, calibration[0], device, loader, trust_remote_code)
    return read_quant_log(out_dir)


def gptq_loader(config, layers: structure.GPTQLayers, trust_remote_code: bool = False) -> str:
    """The loader a user would load the GPTQ checkpoint with: transformers, or GPTQModel where
    transformers has no linear layer to hold a quantized one (fused MoE experts)."""
    return "transformers" if transformers_holds(config, layers.shapes, trust_remote_code) else "gptqmodel"


@contextlib.contextmanager
def _layer_progress(decoder_layers: torch.nn.Module, stream):
    """Progress over the decoder layers (where GPTQModel's definition says they are): layer i's first
    run means the layers before it are done."""
    bar = Progress(len(decoder_layers), "gptq", "layer", stream=stream)

    def on_layer(index: int):
        def hook(*_):
            bar.update(max(0, index - bar.done))

        return hook

    handles = [layer.register_forward_pre_hook(on_layer(i)) for i, layer in enumerate(decoder_layers)]
    try:
        yield
        bar.update(len(decoder_layers) - bar.done)
    finally:
        for h in handles:
            h.remove()
        bar.close()


def _float32_stored_as_bf16(out_dir: Path) -> None:
    """Without native bf16 a CPU runs GPTQModel in float32: its bf16 default runs in generic kernels
    there (362 s against 126 s for 8 calibration windows of SmolLM2 under the AVX2 reproduction).
    The tensors it leaves unquantized (embeddings, norms) are then rewritten in bf16, as GPTQModel
    writes them on any CPU, so the checkpoint's format does not depend on the CPU."""
    from qmerge.io.checkpoint import INDEX_NAME, LazyCheckpoint, ShardWriter

    source = LazyCheckpoint.open(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        writer = ShardWriter(Path(tmp))
        for key in source.keys():
            tensor = source.get(key)
            writer.add(key, tensor.to(torch.bfloat16) if tensor.dtype == torch.float32 else tensor)
        written = writer.finish()
        for old in (*out_dir.glob("*.safetensors"), out_dir / INDEX_NAME):
            old.unlink(missing_ok=True)
        for path in (*written, Path(tmp) / INDEX_NAME):
            if path.exists():
                path.rename(out_dir / path.name)
    config = json.loads((out_dir / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}, indent=2, sort_keys=True) + "\n")


def _scrub_local_paths(out_dir: Path) -> None:
    """GPTQModel records its scratch directory in the checkpoint's configs: a local path that differs
    run to run (breaking byte-identical outputs) and means nothing to whoever loads the checkpoint."""
    for name in ("config.json", "quantize_config.json"):
        path = out_dir / name
        if path.exists():
            path.write_text(json.dumps(_without(json.loads(path.read_text()), "offload_to_disk_path"), indent=2, sort_keys=True) + "\n")


def _without(value, key: str):
    if isinstance(value, dict):
        return {k: _without(v, key) for k, v in value.items() if k != key}
    if isinstance(value, list):
        return [_without(v, key) for v in value]
    return value


def read_quant_log(gptq_dir: Path) -> list[dict]:
    """GPTQModel's per-module losses, ordered by layer and module: its worker threads log the modules
    of one layer in whatever order they finish, which would make two identical runs' reports differ."""
    path = gptq_dir / "quant_log.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{"layer": int(r["layer"]), "module": r["module"], "loss": float(r["loss"]), "samples": int(r["samples"])} for r in csv.DictReader(f)]
    return sorted(rows, key=lambda r: (r["layer"], r["module"]))


@contextlib.contextmanager
def _scratch_cwd(beside: Path):
    """GPTQModel writes per-module logs into ./logs of the working directory; keep the user's clean
    (quant_log.csv in the checkpoint keeps the per-module losses). The scratch (logs and GPTQModel's
    offloaded layers) sits beside the output, on the disk the memory plan counts it on, under a
    partial's name: a killed run's is removed by the next run in that directory, not left in /tmp."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=beside) as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


@contextlib.contextmanager
def _quiet(log_path: Path, verbose: bool):
    """GPTQModel prints banners, tables and its own bars at file-descriptor level; unless verbose,
    send all of it to `log_path` and keep the real stderr for qmerge's own progress bar."""
    if verbose:
        yield sys.stderr
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    progress = os.fdopen(os.dup(2), "w")
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield progress
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            progress.close()
