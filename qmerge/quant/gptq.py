"""GPTQ with GPTQModel (the maintained successor of AutoGPTQ, and the loader transformers 5 and
optimum 2 use for GPTQ), writing the portable profile: format gptq (v1), int32 packing."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from qmerge.io.progress import Progress
from qmerge.models.engine import gptqmodel
from qmerge.settings import GPTQSettings

LOG_NAME = "quantize.log"


def quantize(
    merged_dir: Path, out_dir: Path, calibration: torch.Tensor, gptq: GPTQSettings, device: torch.device, verbose: bool = False, trust_remote_code: bool = False,
    dynamic: dict | None = None, mse: float = 0.0,
) -> list[dict]:
    """Quantize `merged_dir` into `out_dir`; returns the quantizer's per-module log
    (layer, module, loss, samples, damp, time), which is also kept as quant_log.csv. `dynamic`:
    GPTQModel's per-module overrides (checked by qmerge.quant.dynamic); `mse`: its MSE clipping norm
    (0: off, GPTQ's plain min/max grid)."""
    merged_dir, out_dir = Path(merged_dir).resolve(), Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / LOG_NAME
    with _quiet(log_path, verbose) as progress_stream, _scratch_cwd() as scratch:
        engine = gptqmodel()
        config = engine.QuantizeConfig(
            bits=gptq.bits, group_size=gptq.group_size, desc_act=gptq.desc_act, sym=gptq.sym, damp_percent=gptq.damp, format="gptq",
            dynamic=dynamic or None, mse=mse, offload_to_disk_path=str(scratch / "offload"),
        )
        model = engine.GPTQModel.load(str(merged_dir), config, device=str(device), trust_remote_code=trust_remote_code)
        rows = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in calibration]
        layers = model.model.model.layers
        bar = Progress(len(layers), "gptq", "layer", stream=progress_stream)

        def on_layer(index: int):
            def hook(*_):
                bar.update(max(0, index - bar.done))  # layer `index` starts: the layers before it are done

            return hook

        handles = [layer.register_forward_pre_hook(on_layer(i)) for i, layer in enumerate(layers)]
        try:
            model.quantize(rows, batch_size=1)
            bar.update(len(layers) - bar.done)
        finally:
            for h in handles:
                h.remove()
            bar.close()
        model.save(str(out_dir))
    _scrub_local_paths(out_dir)
    return read_quant_log(out_dir)


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
def _scratch_cwd():
    """GPTQModel writes per-module logs into ./logs of the working directory; keep the user's clean
    (quant_log.csv in the checkpoint keeps the per-module losses)."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="qmerge-gptq-") as tmp:
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
