"""Out of core: the merge streams tensor by tensor, so a model larger than the memory the process may
use still merges, into standard HF safetensors shards with an index."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchlib  # noqa: E402

from qmerge.io.checkpoint import INDEX_NAME, LazyCheckpoint, ShardWriter  # noqa: E402

# 190 layers of width 512: ~560M parameters, 1.1 GB of bf16 on disk, in tensors of at most 65 MB.
# A fresh interpreter with torch, transformers, peft and bitsandbytes imported already holds ~470 MB
# of anonymous memory; the merge of this model peaks at ~714 MB anonymous (measured in an unlimited
# cgroup; the adapter, r 4 here, is held whole), so the limit is that plus room for page cache.
# bitsandbytes' CPU NF4 quantizer runs at ~10M weights/s, so to keep the test short the MLPs stay
# 16-bit (a training run's skip list, llm_int8_skip_modules=["gate_proj", "up_proj", "down_proj", "lm_head"]);
# they get the LoRA delta all the same, and every tensor takes the same path through the reader and
# the shard writer.
MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=190, tie_word_embeddings=False)
LIMIT = 800 * 2**20

MERGE = """
import sys
from qmerge import merge_adapter
merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3], merge_into="nf4", device="cpu", skip_modules=["gate_proj", "up_proj", "down_proj", "lm_head"], verify=False)
"""


def test_shards_are_standard_safetensors(tmp_path):
    """Streamed shards read back with safetensors' own loader, every dtype, split at the size limit,
    with the index transformers reads; no temporary files left."""
    tensors = {f"layers.{i}.weight": torch.randn(64, 33).to(torch.bfloat16) for i in range(40)}
    tensors |= {"scalar": torch.tensor(2.5), "ids": torch.arange(7), "mask": torch.tensor([True, False]), "half": torch.randn(3, 5).half()}
    writer = ShardWriter(tmp_path, max_shard_bytes=20_000)
    for key, tensor in tensors.items():
        writer.add(key, tensor)
    shards = writer.finish()
    assert len(shards) == 10  # 40 × 4224 bytes, 4 per 20 kB shard, the small ones fit in the last
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    read = {}
    for shard in shards:
        read |= load_file(shard)
    assert set(index["weight_map"]) == set(read) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for key, tensor in tensors.items():
        assert read[key].dtype == tensor.dtype and torch.equal(read[key], tensor), key
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([INDEX_NAME, *(s.name for s in shards)])


def test_header_space_full_starts_a_new_shard(tmp_path):
    writer = ShardWriter(tmp_path, header_bytes=512)
    for i in range(20):
        writer.add(f"t{i}", torch.zeros(2))
    shards = writer.finish()
    assert len(shards) > 1
    assert {k for s in shards for k in load_file(s)} == {f"t{i}" for i in range(20)}


@pytest.mark.slow
@pytest.mark.skipif(benchlib.memory_cgroup_root() is None, reason="needs a writable cgroup v1 memory controller (/sys/fs/cgroup/memory), i.e. root on a cgroup v1 host")
def test_model_larger_than_the_memory_limit_merges(tmp_path):
    """The merge runs in a cgroup whose limit (page cache included) is well below the model's size;
    the output must be complete and equal an independent recomputation of W_nf4 + scale·B·A."""
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    try:
        benchlib.make_random_model(base, MODEL, adapter, r=4)
        size = benchlib.dir_bytes(base)
        assert size > 1.3 * LIMIT  # the limit is 70% of the model
        with benchlib.memory_limited(LIMIT) as (cgroup, stats):
            benchlib.run_child([*benchlib.python(), "-c", MERGE, str(base), str(adapter), str(out)], cgroup=cgroup)
        print(f"model {size / 2**20:.0f} MiB on disk, cgroup {stats}")
        assert stats["oom_kill"] == 0
        assert stats["failcnt"] > 0  # the limit was reached: page cache was reclaimed to stay under it
        assert stats["max_usage_mb"] * 2**20 <= LIMIT
        _check_merge(base, adapter, out)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # 2.2 GB that pytest would otherwise keep


def _check_merge(base: Path, adapter: Path, out: Path) -> None:
    """Every tensor present; untouched ones byte-equal to the base; the linear layers of the first,
    a middle and the last block equal bitsandbytes' NF4 round trip rounded to the bf16 compute dtype
    (attention; MLPs skipped) plus the LoRA delta."""
    import bitsandbytes.functional as F

    merged, original = LazyCheckpoint.open(out), LazyCheckpoint.open(base)  # one tensor at a time here too
    assert set(merged.keys()) == set(original.keys())
    lora = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    last = MODEL["num_hidden_layers"] - 1
    for key, w in original.items():
        if not key.endswith("proj.weight"):
            assert torch.equal(merged.get(key), w), key
        elif any(f"layers.{i}." in key for i in (0, last // 2, last)):
            if ".mlp." in key:
                as_trained = w.float()
            else:
                packed, state = F.quantize_4bit(w.float(), blocksize=64, compress_statistics=True, quant_type="nf4")
                as_trained = F.dequantize_4bit(packed, state).to(torch.bfloat16).float()  # as bnb's bf16 forward computes with it
            name = "base_model.model." + key.removesuffix(".weight")
            delta = lora[f"{name}.lora_B.weight"].float() @ lora[f"{name}.lora_A.weight"].float() * scale
            expected = (as_trained + delta).to(torch.bfloat16)
            assert torch.equal(merged.get(key), expected), key
