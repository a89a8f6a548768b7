"""GPTQModel, imported without pinning memory.

Some GPTQModel modules keep the ImportError of an optional dependency at module level (gguf_cpp's
_LLAMA_CPP_IMPORT_ERROR when llama_cpp is absent), traceback included. A traceback holds the frame
of every caller up the stack of that first import, and each frame holds its locals: when PEFT's
model setup inside qmerge's verify triggered the import, a float32 copy of the model (532 MB for
SmolLM2-135M) stayed alive for the rest of the run. `gptqmodel()` imports it and drops those
tracebacks; the exceptions and their messages stay for GPTQModel to raise.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from types import ModuleType


def gptqmodel() -> ModuleType:
    """The gptqmodel package, with no module-level exception of its holding a traceback."""
    import gptqmodel

    for name, module in list(sys.modules.items()):
        if name == "gptqmodel" or name.startswith("gptqmodel."):
            for value in list(vars(module).values()):
                while isinstance(value, BaseException):
                    value.__traceback__ = None
                    value = value.__cause__ or value.__context__
    return gptqmodel


@contextlib.contextmanager
def transformers_unpatched(model_type: str) -> Iterator[None]:
    """Undo, when the block ends, what GPTQModel's loader patches in transformers for the rest of the
    process: for MoE families it swaps the model classes for per-expert ones and replaces
    transformers' checkpoint conversion mapping (defuser.replace_fused_blocks). Left in place, every
    later load in the process (the drift stage, verify, another run through the API, a test's model
    made after it) would build other modules and read checkpoints under other names."""
    with contextlib.suppress(ImportError):  # the family's modeling module, so that its classes are in the snapshot
        importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    saved = {name: dict(vars(module)) for name, module in list(sys.modules.items())
             if module is not None and (name.startswith("transformers.models.") or name in ("transformers.conversion_mapping", "transformers.modeling_utils"))}
    try:
        yield
    finally:
        for name, attributes in saved.items():
            namespace = vars(sys.modules[name])
            for key, value in attributes.items():
                if namespace.get(key) is not value:
                    namespace[key] = value
            for key in [k for k, v in namespace.items() if k not in attributes and _patched_in(v)]:
                del namespace[key]  # added by the patch (transformers.modeling_utils.get_checkpoint_conversion_mapping)


def _patched_in(value) -> bool:
    return getattr(value, "__module__", "").startswith(("defuser", "gptqmodel"))
