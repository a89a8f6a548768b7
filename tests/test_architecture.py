"""The layout holds: the import-linter contracts in pyproject.toml pass (and catch a wrong import),
and every module and function stays small enough to read in one sitting."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qmerge"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 300, 60


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """import-linter on the package found first on the path in `cwd` (the config is pyproject.toml there)."""
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--no-cache"], cwd=cwd, capture_output=True, text=True, env={"PYTHONPATH": str(cwd), "PATH": ""}, timeout=300)


def test_import_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Contracts: 4 kept, 0 broken." in result.stdout


def test_a_wrong_import_breaks_the_layering(tmp_path):
    """The merge importing the drift evaluation (what verify once did) is caught, by name."""
    shutil.copytree(PACKAGE, tmp_path / "qmerge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    nf4 = tmp_path / "qmerge" / "merge" / "nf4.py"
    nf4.write_text(nf4.read_text().replace("from qmerge.settings import NF4Settings\n", "from qmerge.settings import NF4Settings\nfrom qmerge.eval import drift  # noqa: F401\n"))
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "qmerge.merge is not allowed to import qmerge.eval" in result.stdout and "qmerge.merge.nf4 -> qmerge.eval.drift" in result.stdout


def test_modules_and_functions_are_small():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        name = path.relative_to(ROOT)
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                too_long.append(f"{name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
