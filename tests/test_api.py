"""The Python API is discoverable (dir, help, __all__) while `import qmerge` stays light."""

from __future__ import annotations

import inspect
import json
import pydoc
import subprocess
import sys

import qmerge

FUNCTIONS = ("run", "merge_adapter", "gptq_quantize", "evaluate", "verify", "push")


def test_import_is_light_and_dir_lists_the_api():
    """In a fresh interpreter: dir(qmerge) names the API before anything heavy is imported."""
    code = "import json, sys, qmerge; print(json.dumps({'dir': dir(qmerge), 'all': qmerge.__all__, 'heavy': [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]}))"
    shown = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout)
    assert set(FUNCTIONS) <= set(shown["dir"]) and set(FUNCTIONS) <= set(shown["all"]) and "QmergeError" in shown["all"]
    assert shown["heavy"] == []


def test_help_lists_every_function_with_its_doc():
    text = pydoc.render_doc(qmerge, renderer=pydoc.plaintext)
    assert "FUNCTIONS" in text
    for name in FUNCTIONS:
        function = getattr(qmerge, name)
        assert f"{name}(" in text and inspect.getdoc(function).splitlines()[0] in text, name
    assert set(qmerge.__all__) <= set(dir(qmerge)) and all(hasattr(qmerge, name) for name in qmerge.__all__)
