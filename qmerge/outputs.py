"""The run's outputs from its stage results on disk: report.json/.md/.html (with the drift-budget
search's record when the GPTQ stage searched), the resolved recipe and the GPTQ model card."""

from __future__ import annotations

import json
from pathlib import Path

from qmerge import recipe
from qmerge.eval import candidates
from qmerge.models.device import device_info
from qmerge.plan import Plan
from qmerge.prepare import Prepared
from qmerge.quant import dynamic
from qmerge.quant.gptq import read_quant_log
from qmerge.quant.servers import servers
from qmerge.report import card, files
from qmerge.report.assemble import assemble
from qmerge.report.markdown import table
from qmerge.report.schema import library_versions
from qmerge.runner import StageRunner
from qmerge.settings import RunSettings


def report_of(settings: RunSettings, p: Prepared, out: Path, inputs: dict, runner: StageRunner, plan: Plan) -> dict:
    """The report, from the stage results on disk and what the run recorded."""
    gptq = not settings.skip_gptq
    resolved = settings.to_dict()
    resolved["gptq"]["group_size_auto"] = p.plan is not None and p.plan.note is not None
    found = _read_json(out / "gptq" / "search.json") if gptq else None
    verdicts = servers(settings.gptq, p.in_features, p.plan.loader) if gptq else {}
    if found:  # the chosen checkpoint's per-module overrides decide which servers load it
        verdicts = dynamic.servers_with(verdicts, found["rows"][found["chosen"]]["dynamic"], settings.gptq, p.linears)
    return assemble(
        inputs=inputs, settings=resolved,
        reference={"name": candidates.REFERENCES[settings.reference_kind], "kind": settings.reference_kind},
        versions=library_versions(), device=device_info(p.device), merge=runner.infos["merged"], stages=runner.records,
        candidates=json.loads((out / "drift" / "candidates.json").read_text()),
        evaluations=files.undefined_as_nan(json.loads((out / "drift" / "evaluations.json").read_text())),
        final=candidates.display_name(settings.final_kind, settings.gptq, settings.merge_into, settings.search),
        servers=verdicts, gptq_log=read_quant_log(out / "gptq") if gptq else [],
        recipe=recipe.resolved(settings), samples=_read_json(out / "drift" / "samples.json"), plan=plan.to_dict(), search=found,
    )


def _read_json(path: Path):
    """A stage file added since the stage's first release (None when a reused stage predates it)."""
    return json.loads(path.read_text()) if path.exists() else None


def write_outputs(rep: dict, settings: RunSettings, out: Path, echo: bool) -> None:
    files.write(rep, out)
    recipe.dump(settings, out / "recipe.resolved.yaml")
    if not settings.skip_gptq:
        (out / "gptq" / "README.md").write_text(card.render(rep))
    if echo:
        print(table(rep))
        print(f"[qmerge] merged checkpoint: {out / 'merged'}")
        if not settings.skip_gptq:
            print(f"[qmerge] GPTQ checkpoint:   {out / 'gptq'}")
        print(f"[qmerge] report:            {out / 'report.md'} (and report.json)")
