"""qmerge: merge a QLoRA adapter into the NF4 weights it was trained against, re-quantize with
GPTQ, and measure what each step cost against the model as trained."""

import os

__version__ = "0.1.0"

# GPTQModel sizes a CPU thread pool at import and fails on small machines (2 cores) without this;
# set before any path (quantize, or transformers loading a GPTQ checkpoint) imports it.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 4))))
