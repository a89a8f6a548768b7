"""qmerge: merge a QLoRA adapter into the NF4 weights it was trained against, re-quantize with
GPTQ, and measure what each step cost against the model as trained."""

import os

from qmerge.settings import VERSION as __version__

# GPTQModel sizes a CPU thread pool at import and fails on small machines (2 cores) without this;
# set before any path (quantize, or transformers loading a GPTQ checkpoint) imports it.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 4))))

API = ("run", "merge_adapter", "gptq_quantize", "evaluate", "verify", "push")


def __getattr__(name: str):
    """`from qmerge import run, merge_adapter, gptq_quantize, evaluate, verify, push`, imported on first use so
    that `import qmerge` stays light (the CLI configures library logging before torch loads)."""
    if name in API:
        from qmerge import api

        return getattr(api, name)
    raise AttributeError(f"module 'qmerge' has no attribute {name!r}")
