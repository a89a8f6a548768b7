"""The model card of DIR/gptq: Hugging Face metadata plus the drift table, so the checkpoint reads
on the hub as people expect a quantized model to."""

from __future__ import annotations

from qmerge.report.markdown import merged_into, table


def render(rep: dict) -> str:
    s = rep["settings"]
    g = s["gptq"]
    base = rep["inputs"]["base"]["spec"]
    adapter = rep["inputs"]["adapter"]["spec"]
    # hub metadata names hub ids only; a local base stays in the text
    base_meta = f"base_model: {base}\n" if rep["inputs"]["base"]["from_hub"] else ""
    servers = "\n".join(f"| {name} | {'yes' if v['loads'] else 'no'} | {v['why']} |" for name, v in rep["servers"].items())
    return f"""---
{base_meta}base_model_relation: quantized
library_name: transformers
tags:
- gptq
- {g['bits']}-bit
- qlora
- qmerge
---

# {g['bits']}-bit GPTQ of `{base}` + QLoRA adapter `{adapter}`

The adapter was {merged_into(rep)} by qmerge, then quantized with GPTQModel:
format gptq (v1), {g['bits']}-bit, group size {g['group_size']}, sym={g['sym']}, desc_act={g['desc_act']},
int32 packing, calibrated on `{s['data']['calibration']}` ({rep['inputs']['calibration_windows']} windows of
{s['data']['seq_len']} tokens).

## Drift from the QLoRA model as trained

Eval on `{rep['evaluations'][0]['eval']}`; KLD = KL(as trained ‖ model); standard errors clustered by window;
size = bytes of tensor data, bits/weight over the quantized linear layers.

{table(rep)}
## Servers

| server | loads | note |
|---|---|---|
{servers}

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("THIS_REPO", device_map="auto")
```
"""
