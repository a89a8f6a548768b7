#!/usr/bin/env bash
# Every GPU check in one short run, for a lent H100/H200 (see BENCHMARKS.md for recorded results).
# The device image has torch but not this stack: carry wheels in .whl/ (listed in .git/info/exclude),
# made here with `pip download --no-deps` for Python 3.12 manylinux (see the device tool's README):
#   bitsandbytes==0.50.2 peft==0.21.2 transformers==5.24.0 optimum==2.3.0, plus gptqmodel==7.7.0,
#   logbar, tokenicer, device-smi, defuser (pure-Python wheels pip built here: ~/.cache/pip/wheels).
# They install to /tmp/site. Run: device tool `run` with carry [".whl"] and
#   bash scripts/device_check.sh [--only nf4,tiny,bandwidth,7b]
# Issue 15's measurement (the whole run on a Llama-3-8B-shaped model, ~10 min of a lease) on its own:
#   bash scripts/device_check.sh --only run8b [--calibration-samples 128]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  # pypcre (a C extension gptqmodel imports) has no wheel for the image's Python: stand in re for it.
  python3 -c "import pcre" 2>/dev/null || cat > /tmp/site/pcre.py <<'PY'
"""Device-check stand-in for pypcre: Python's re under the names gptqmodel uses."""
import re
from re import Pattern, compile, escape, split


class Flag:
    CASELESS = re.IGNORECASE
    MULTILINE = re.MULTILINE
    DOTALL = re.DOTALL
PY
fi
export PYTHONUNBUFFERED=1
python3 scripts/device_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/device_check.log"
