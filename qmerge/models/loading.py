"""Every model load checked for weights it missed or ignored.

transformers reports a tensor the model expects but the checkpoint lacks (it initialises it at
random) or one the checkpoint holds but the model has no place for (it drops it) only as a log
warning, which qmerge silences by default: the one sign that a model computes with random weights.
Every load of a base, reference, candidate or GPTQ checkpoint goes through here and turns that
report into an error naming the tensor."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM

from qmerge.errors import QmergeError

_KINDS = (("missing_keys", "lacks", "transformers would initialise it at random"), ("unexpected_keys", "holds", "the model has no place for it"),
          ("mismatched_keys", "holds a differently shaped", "the model expects another shape"))


def from_pretrained(path: Path, what: str, error: type[Exception] = QmergeError, **kwargs):
    """AutoModelForCausalLM.from_pretrained(path, **kwargs), refusing with `error` when the load
    missed, dropped or reshaped any tensor. `what` names the checkpoint in the message."""
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    problem = load_problem(info)
    if problem is not None:
        raise error(f"{what} ({path}) {problem}; restore or re-save that checkpoint")
    return model


def load_problem(info: dict) -> str | None:
    """The first tensor a load missed, dropped or reshaped, in words; None for a clean load."""
    for field, verb, why in _KINDS:
        keys = sorted(_key(k) for k in info.get(field) or ())
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            return f"{verb} tensor {keys[0]}{more}: {why}"
    errors = info.get("error_msgs") or []
    return f"failed to load: {errors[0]}" if errors else None


def _key(entry) -> str:
    """A loading-info entry as a key (mismatched keys come as (key, shape, shape) tuples)."""
    return entry[0] if isinstance(entry, tuple) else str(entry)
