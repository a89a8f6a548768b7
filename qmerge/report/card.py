"""The model card of DIR/gptq: Hugging Face metadata plus the drift table, so the checkpoint reads
on the hub as people expect a quantized model to."""

from __future__ import annotations

import json

from qmerge.report import search
from qmerge.report.markdown import merged_into, table


def yaml_lines(meta: dict) -> str:
    """A flat YAML mapping (strings quoted as JSON, which YAML reads), lists as block sequences."""
    out = []
    for key, value in meta.items():
        if isinstance(value, list):
            out.append(f"{key}:\n" + "".join(f"- {json.dumps(v)}\n" for v in value))
        else:
            out.append(f"{key}: {json.dumps(value)}\n")
    return "".join(out)


def metadata(rep: dict) -> dict:
    """The card's YAML header, following the hub's model-card spec for a quantized fine-tune:
    `base_model` the base's hub id (hub ids only: a local base is named in the text), the relation
    `quantized` set explicitly (the hub would otherwise guess from the files), the library, the task."""
    base = rep["inputs"]["base"]
    meta = {"base_model": hub_id(base["spec"])} if base.get("from_hub") else {}
    tags = ["gptq", f"{rep['settings']['gptq']['bits']}-bit", "qlora" if rep.get("reference", {}).get("kind", "qlora") == "qlora" else "lora", "qmerge"]
    return {**meta, "base_model_relation": "quantized", "library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}


def hub_id(spec: str) -> str:
    return spec.partition("@")[0]


def _adapters(rep: dict) -> str:
    """The adapter(s), linked when on the hub, with the revision and commit the run read."""
    adapter = rep["inputs"]["adapter"]
    parts = adapter.get("parts") or [adapter]
    named = []
    for part in parts:
        spec = part["spec"].rsplit(":", 1)[0] if "weight" in part else part["spec"]
        at = f" (revision `{part['revision']}`, commit `{part['commit']}`)" if part.get("commit") else ""
        link = f"[`{hub_id(spec)}`](https://huggingface.co/{hub_id(spec)})" if "commit" in part else f"`{spec}`"
        weight = f" × {part['weight']:g}" if "weight" in part else ""
        named.append(f"{link}{at}{weight}")
    return " + ".join(named)


def render(rep: dict) -> str:
    s = rep["settings"]
    g = s["gptq"]
    base = rep["inputs"]["base"]
    servers = "\n".join(f"| {name} | {'yes' if v['loads'] else 'no'} | {v['why']} |" for name, v in rep["servers"].items())
    pinned = f" at revision `{base['revision']}` (commit `{base['commit']}`)" if base.get("commit") else ""
    return f"""---
{yaml_lines(metadata(rep))}---

# {g['bits']}-bit GPTQ of `{hub_id(base['spec'])}` + adapter {_adapters(rep)}

Base `{hub_id(base['spec'])}`{pinned}; adapter {_adapters(rep)}.
The adapter was {merged_into(rep)} by qmerge, then quantized with GPTQModel:
format gptq (v1), {g['bits']}-bit, group size {g['group_size']}, sym={g['sym']}, desc_act={g['desc_act']},
int32 packing, calibrated on `{s['data']['calibration']}` ({rep['inputs']['calibration_windows']} windows of
{s['data']['seq_len']} tokens).

## Drift from the QLoRA model as trained

Eval on `{rep['evaluations'][0]['eval']}`; KLD = KL(as trained ‖ model); standard errors clustered by window;
size = bytes of tensor data, bits/weight over the quantized linear layers.

{table(rep)}
{search.card(rep.get("search"))}
## Servers

| server | loads | note |
|---|---|---|
{servers}

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("THIS_REPO", device_map="auto")
```
"""
