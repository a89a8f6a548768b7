"""The version of report.json's layout (readers refuse others) and the library versions it records."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SCHEMA_VERSION = 2
LIBRARIES = ("qmerge", "torch", "transformers", "peft", "bitsandbytes", "gptqmodel", "optimum", "safetensors", "accelerate")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the stack (None where absent), read from package metadata without
    importing any of it."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
