"""qmerge: merge a QLoRA adapter into the NF4 weights it was trained against, re-quantize with GPTQ,
and measure what each step cost against the model as trained.

The API (each function is also a CLI command; settings are the CLI's long options with underscores):

    run(base, adapter, out, **settings)            the whole pipeline: merge, GPTQ, drift, report
    merge_adapter(base, adapter, out, **settings)  the merge stage (verified against PEFT's own)
    gptq_quantize(merged, out, **settings)         the GPTQ stage of a merged checkpoint
    evaluate(base, adapter, out, **settings)       the drift stage and report of a run directory,
                                                   and of checkpoints made elsewhere (GPTQ, AWQ)
    verify(merged, base, adapter, **settings)      a merged checkpoint against PEFT's own merge
    push(directory, repo_id)                       upload a checkpoint to the Hugging Face hub

Bad input raises QmergeError (a VerifyError when a merge differs from PEFT's). `import qmerge` stays
light: torch and the rest load when a function is first used.
"""

import os

from qmerge.errors import QmergeError, VerifyError
from qmerge.settings import VERSION as __version__

# GPTQModel sizes a CPU thread pool at import and fails on small machines (2 cores) without this;
# set before any path (quantize, or transformers loading a GPTQ checkpoint) imports it.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 4))))

API = ("run", "merge_adapter", "gptq_quantize", "evaluate", "verify", "push", "RunResult", "QuantizeResult")
__all__ = [*API, "QmergeError", "VerifyError", "__version__"]


def __getattr__(name: str):
    """The API, imported on first use so that `import qmerge` stays light (the CLI configures library
    logging before torch loads)."""
    if name in API:
        from qmerge import api

        return getattr(api, name)
    raise AttributeError(f"module 'qmerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    """dir(qmerge) lists the API beside what is already imported (help() and completion use it)."""
    return sorted({*globals(), *__all__})
