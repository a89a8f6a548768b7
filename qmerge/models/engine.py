"""GPTQModel, imported without pinning memory.

Some GPTQModel modules keep the ImportError of an optional dependency at module level (gguf_cpp's
_LLAMA_CPP_IMPORT_ERROR when llama_cpp is absent), traceback included. A traceback holds the frame
of every caller up the stack of that first import, and each frame holds its locals: when PEFT's
model setup inside qmerge's verify triggered the import, a float32 copy of the model (532 MB for
SmolLM2-135M) stayed alive for the rest of the run. `gptqmodel()` imports it and drops those
tracebacks; the exceptions and their messages stay for GPTQModel to raise.
"""

from __future__ import annotations

import sys
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
