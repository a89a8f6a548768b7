#!/usr/bin/env bash
# Serve a qmerge GPTQ checkpoint with vLLM on a GPU host (OpenAI-compatible API on port 8000).
# vLLM's gptq_marlin kernel needs symmetric 4- or 8-bit weights and a group size that divides every
# quantized layer's in_features; DIR/report.json's "servers" entry says whether this checkpoint fits.
#   bash scripts/serve_vllm.sh out/run/gptq [extra vllm args]
set -euo pipefail
dir=${1:?usage: serve_vllm.sh DIR/gptq [vllm args]}
shift
report="$(dirname "$dir")/report.json"
if [ -f "$report" ] && ! python3 -c "import json,sys; sys.exit(0 if json.load(open('$report'))['servers']['vllm']['loads'] else 1)"; then
  echo "serve_vllm.sh: $dir cannot be served by gptq_marlin: $(python3 -c "import json; print(json.load(open('$report'))['servers']['vllm']['why'])")" >&2
  exit 2
fi
exec vllm serve "$dir" --quantization gptq_marlin --dtype float16 "$@"
