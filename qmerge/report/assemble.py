"""report.json's content as a function of what the stages produced: no torch, no I/O."""

from __future__ import annotations

from qmerge.report.schema import SCHEMA_VERSION


def assemble(*, inputs: dict, settings: dict, reference: dict, versions: dict, device: dict, merge: dict, stages: dict, candidates: dict,
             evaluations: list[dict], final: str, servers: dict, gptq_log: list[dict], recipe: dict, samples: dict | None = None, plan: dict | None = None,
             search: dict | None = None) -> dict:
    """The report (schema 2): the stage results in their sections, and the quality budgets checked on
    the final checkpoint's row of the first eval set; `samples` (the side-by-side completions) when
    the run made them."""
    return {
        "schema_version": SCHEMA_VERSION,
        "inputs": inputs,
        "settings": settings,
        "reference": reference,
        "versions": versions,
        "device": device,
        "merge": merge,
        "stages": stages,
        "candidates": candidates,
        "evaluations": evaluations,
        "final": final,
        "budgets": budgets(settings, evaluations[0]["metrics"][final]),
        "servers": servers,
        "gptq_log": gptq_log,
        "recipe": recipe,
        **({"samples": samples} if samples else {}),
        **({"plan": plan} if plan is not None else {}),
        **({"search": search} if search else {}),
    }


def budgets(settings: dict, final: dict) -> dict:
    """The quality budgets the user set, checked on the final checkpoint (GPTQ, or merged with --skip-gptq)."""
    out = {}
    for name, value in (("max_kld", final["kld_mean"]), ("max_ppl_ratio", final["ppl_ratio"])):
        limit = settings.get(name)
        if limit is not None:
            out[name] = {"limit": limit, "value": value, "ok": value <= limit}
    return out
